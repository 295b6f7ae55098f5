//! The dashboard's SLO page and `/api/slo` over a real SQLite store: fleet-health's report and
//! ledger rows written through its own port ([`HealthLedger`]), the local stack's router served
//! on loopback, plain HTTP GETs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::ledger::{evaluate, HealthReport};
use fleet_shared::health::slo::Catalog;
use fleet_shared::health::tally::{counter, minute_of, Cohort, Tally};
use fleet_shared::ports::{HealthLedger, SloReader};
use fleet_shared::time;
use serde_json::Value;

use crate::support::{dashboard, get};

/// What each minute of the last two hours adds, for the fleet and `env-sensor/eu-west/*`:
/// 9 of 10 active devices fresh, all 10 connected, 2 of 100 messages quarantined.
fn a_minute() -> Tally {
    let mut t = Tally::default();
    for (name, n) in [
        (counter::FRESH_MINUTES, 9),
        (counter::ACTIVE_MINUTES, 10),
        (counter::CONNECTED_MINUTES, 10),
        (counter::CONNECTIVITY_MINUTES, 10),
        (counter::RECEIVED, 100),
        (counter::QUARANTINED, 2),
    ] {
        t.add(name, n);
    }
    t
}

/// Two hours of ledger rows closed through the last minute, and fleet-health's evaluation of
/// them stored as its report, as its run would.
async fn two_hours_of_health(store: &SqliteStore) -> Result<HealthReport> {
    let now = time::now_ms();
    let end = minute_of(now) - 1;
    let cohorts = [Cohort::fleet(), Cohort::new("env-sensor", "eu-west", Cohort::ANY)];
    let mut sum = Tally::default();
    for minute in end - 119..=end {
        sum.add_all(&a_minute());
        let rows: Vec<(Cohort, Tally)> = cohorts.iter().map(|c| (c.clone(), sum.clone())).collect();
        store.close_minute(minute, &rows).await?;
    }
    let catalog = Catalog::builtin();
    let mut evaluated = Vec::new();
    for cohort in &cohorts {
        let (_, head) = store.row_at(cohort, end).await?.context("a row at the end")?;
        let mut starts = BTreeMap::new();
        for w in catalog.windows() {
            starts.insert(w, store.row_at(cohort, end - w).await?.map(|(_, t)| t));
        }
        let start = |w: i64| starts.get(&w).cloned().flatten();
        evaluated.push(evaluate(&catalog, cohort, end, &head, &start, &a_minute()));
    }
    let report = HealthReport { minute: end, computed_at_ms: now, cohorts: evaluated };
    store.put_health(&report).await?;
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_page_shows_each_slo_of_the_fleet_and_its_cohorts_with_charts_and_alerts() -> Result<()> {
    // GIVEN fleet-health's report over two hours of 90 % freshness and 2 % of messages
    // quarantined (the ingest SLO allows 0.1 %: it burns 20 times too fast, paging)
    let store = SqliteStore::in_memory()?;
    two_hours_of_health(&store).await?;
    let addr = dashboard(&store).await?;
    // WHEN the SLO page is asked for
    let (status, html) = get(addr, "/slo").await?;
    // THEN each SLO shows with its description, objective, SLI, budget, burn rates and alerts
    assert_eq!(status, 200, "{html}");
    for part in [
        r#"<table class="slo" id="slo-fleet">"#,
        "<strong>freshness</strong>",
        "Share of active devices (data in the last 24 h) with data in the last 2 minutes",
        "<th>SLI 28d</th>",
        r#"<th class="num">burn 5m</th><th class="num">burn 30m</th><th class="num">burn 1h</th>"#,
        r#"<td class="num">95%</td>"#,
        r#"<td class="num">99.9%</td>"#,
        "90.00%",
        "<span class=\"muted small\">1080 / 1200</span>",
        r#"<td class="num over">-100.0%</td>"#,
        "98.00%",
        r#"<td class="num over">-1900.0%</td>"#,
        r#"<td class="num burn-page">20.0</td>"#,
        r#"<td class="num burn-ticket">20.0</td>"#,
        r#"<span class="badge page">page</span> <span class="badge ticket">ticket</span>"#,
        "100%",
        r#"<td class="num">100.0%</td>"#,
        r#"id="slo-alerts">4<"#,
        r#"id="slo-active">10<"#,
        "<h3><code>env-sensor/eu-west/*</code></h3>",
        r#"<td title="Share of active devices connected, sampled every minute."><strong>connectivity</strong></td>"#,
        "the 6h and 30m burn rates both exceed 6. ",
    ] {
        assert!(html.contains(part), "the SLO page lacks {part}:\n{html}");
    }
    // AND the fleet's SLOs with events are charted (SLI and burn rates), the others say so
    assert_eq!(html.matches("<svg").count(), 6, "freshness, connectivity, ingest: two charts each");
    assert!(html.contains("No command-latency events in the last 6h: nothing to chart."), "{html}");
    assert!(html.contains("No ota events in the last 6h"), "{html}");
    assert_eq!(html.matches("<table").count(), 2, "the fleet and its one class/region");
    // AND the fleet page links to it
    let (_, fleet) = get(addr, "/").await?;
    assert!(fleet.contains(r#"<a href="/slo">"#), "{fleet}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_slo_answers_the_stored_report_as_json() -> Result<()> {
    // GIVEN fleet-health's stored report
    let store = SqliteStore::in_memory()?;
    let report = two_hours_of_health(&store).await?;
    let addr = dashboard(&store).await?;
    // WHEN /api/slo is asked for
    let (status, body) = get(addr, "/api/slo").await?;
    // THEN it is that report, whole
    assert_eq!(status, 200, "{body}");
    let got: Value = serde_json::from_str(&body)?;
    let want: Value = serde_json::from_str(&serde_json::to_string(&report)?)?;
    assert_eq!(got, want);
    let parsed: HealthReport = serde_json::from_str(&body)?;
    assert_eq!(parsed.cohorts.len(), 2);
    assert_eq!(parsed.cohorts[0].cohort, Cohort::fleet(), "the fleet first");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_fleet_health_has_run_the_page_says_so_and_the_api_answers_404() -> Result<()> {
    // GIVEN a store fleet-health has never written to
    let store = SqliteStore::in_memory()?;
    let addr = dashboard(&store).await?;
    // WHEN the SLO page and API are asked for
    let (page_status, html) = get(addr, "/slo").await?;
    let (api_status, body) = get(addr, "/api/slo").await?;
    // THEN the page says plainly that fleet-health has not run, and the API is a JSON 404
    assert_eq!(page_status, 200, "{html}");
    assert!(html.contains("fleet-health has not run yet: it runs every minute."), "{html}");
    assert!(!html.contains("<svg") && !html.contains("<table"), "{html}");
    assert_eq!(api_status, 404, "{body}");
    let error: Value = serde_json::from_str(&body)?;
    assert!(error["error"].as_str().is_some_and(|e| e.contains("fleet-health has not run")), "{body}");
    Ok(())
}
