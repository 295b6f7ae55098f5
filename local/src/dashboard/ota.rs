//! `/ota` and `/ota/<id>`: OTA campaigns (firmware rollouts and certificate rotations), what
//! `fleetctl ota list` and `fleetctl ota show` print, as pages that refresh themselves.

use fleet_shared::ota::campaign::{Campaign, Change, State};
use fleet_shared::text::printable;
use fleet_shared::time::rfc3339_ms;
use maud::{html, Markup};

use super::{age, card, page};

/// Campaigns `/ota` lists: those not ended first, newest first.
pub const CAMPAIGN_ROWS: usize = 100;
/// Log lines a campaign's page shows: the newest ones.
pub const LOG_ROWS: usize = 50;
/// How much of a campaign's last log line `/ota` shows.
const LAST_LINE_CHARS: usize = 120;

fn nav() -> Markup {
    html! { p.nav { a href="/" { "← fleet" } " · " a href="/slo" { "SLOs" } } }
}

/// A CSS class for a state worth a glance: failures red, pauses amber.
fn state_class(c: &Campaign) -> &'static str {
    match (&c.state, &c.paused) {
        (s, _) if s.is_failure() => "over",
        (_, Some(_)) => "drift",
        (State::Completed, _) => "online",
        _ => "",
    }
}

/// `(state tag, paused, campaigns)`, as the local store counts them.
pub type Counts = [(String, bool, u64)];

fn shortened(text: &str, max: usize) -> String {
    let text = printable(text);
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// `/ota`: every campaign counted by state (`counts`), and `campaigns` listed (at most
/// [`CAMPAIGN_ROWS`]: those not ended first, newest first).
pub fn campaigns_page(campaigns: &[Campaign], counts: &Counts, now: i64) -> Markup {
    let count = |f: &dyn Fn(&str, bool) -> bool| -> u64 {
        counts.iter().filter(|(s, p, _)| f(s, *p)).map(|(_, _, n)| n).sum()
    };
    let ended = |s: &str| State::FINAL_NAMES.contains(&s);
    let failed = |s: &str| State::FAILURE_NAMES.contains(&s);
    let total = count(&|_, _| true);
    let cards = [
        ("campaigns-total", "campaigns", total),
        ("campaigns-active", "rolling out", count(&|s, p| !ended(s) && !failed(s) && !p)),
        ("campaigns-paused", "paused", count(&|s, p| !ended(s) && p)),
        ("campaigns-completed", "completed", count(&|s, _| s == "completed")),
        ("campaigns-failed", "rolling back, rolled back or halted", count(&|s, _| failed(s))),
        ("campaigns-aborted", "aborted", count(&|s, _| s == "aborted")),
    ];
    let body = html! {
        h1 { "OTA campaigns" }
        (nav())
        div.cards { @for (id, label, value) in &cards { (card(id, label, &value.to_string())) } }
        @if campaigns.is_empty() {
            p #campaigns-none {
                "No campaign yet: " code { "fleetctl ota create" } " (firmware) or "
                code { "fleetctl ota rotate-certs" } " (certificates); "
                code { "fleetctl demo --ota 1.4.2:1.5.0" } " or " code { "--rotate" } " makes some."
            }
        } @else {
            @if total > campaigns.len() as u64 {
                p.muted { (campaigns.len()) " of " (total) ": those not ended first, newest first." }
            }
            table #campaigns {
                tr {
                    th { "campaign" } th { "change" } th { "state" } th { "stage" }
                    th { "targeted / eligible" } th { "updated" } th { "last" }
                }
                @for c in campaigns {
                    tr {
                        td { a href={ "/ota/" (c.spec.id) } { (c.spec.id) } }
                        td.change { (printable(&c.change_text())) }
                        td class={ "state " (state_class(c)) } { (c.state_text()) }
                        td { (c.stage_text()) }
                        td.num { (c.targeted) " / " (c.population) }
                        td { (age(c.updated_ms, now)) " ago" }
                        td.small { (c.log.last().map_or_else(String::new, |l| shortened(&l.text, LAST_LINE_CHARS))) }
                    }
                }
            }
        }
    };
    page("OTA campaigns", body)
}

/// `/ota/<id>`: one campaign, its rollout settings, jobs and log (the newest [`LOG_ROWS`]).
pub fn campaign_page(c: &Campaign, now: i64) -> Markup {
    let s = &c.spec;
    let minutes = |m: i64| format!("{m} min");
    let mut settings = vec![
        ("stages", s.stages.iter().map(|p| format!("{p}%")).collect::<Vec<_>>().join(", ")),
        ("soak", minutes(s.soak_minutes)),
        ("stage timeout", minutes(s.stage_timeout_minutes)),
        ("failures allowed", format!("{}%", s.max_failure_pct)),
        ("rate", format!("{} devices/min", s.max_per_minute)),
        ("install timeout", minutes(i64::from(s.install_timeout_minutes))),
        (
            "preconditions",
            match (s.preconditions.min_battery_pct, s.preconditions.seen_within_minutes) {
                (None, None) => "none".to_owned(),
                (b, m) => [b.map(|b| format!("battery ≥ {b}%")), m.map(|m| format!("seen within {m} min"))]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", "),
            },
        ),
    ];
    if s.change == Change::Firmware {
        let g = &s.gate;
        settings.push((
            "health gate",
            format!(
                "SLOs {} over {} min, ≥ {} events; canary ≤ {}× control's burn, nothing widens above {}×",
                g.slos.join(", "),
                g.window_minutes,
                g.min_events,
                g.max_ratio,
                g.max_burn
            ),
        ));
    }
    let hidden = c.log.len().saturating_sub(LOG_ROWS);
    let body = html! {
        h1 { "Campaign " code { (s.id) } }
        p.nav { a href="/ota" { "← campaigns" } " · " a href="/" { "fleet" } }
        div.cards {
            (card("campaign-state", "state", &c.state_text()))
            (card("campaign-stage", "stage", &c.stage_text()))
            (card("campaign-targeted", "targeted", &c.targeted.to_string()))
            (card("campaign-population", "eligible", &c.population.to_string()))
        }
        p #campaign-change { (printable(&c.change_text())) }
        @if let Some(why) = &c.paused {
            p.warn #campaign-paused { "Paused: " (printable(why)) }
        }
        @if let Some(why) = c.end_reason() {
            p #campaign-reason { "Why it ended: " (printable(why)) }
        }
        @match &c.state {
            State::Stage(st) => p #campaign-job {
                "Stage " (st.stage + 1) ": job " code { (st.job.as_str()) } ", " (st.targets) " devices, started "
                (age(st.started_ms, now)) " ago. "
                span.muted { (printable(st.last.as_deref().unwrap_or("Not looked at yet."))) }
            },
            State::RollingBack { job, started_ms, reason, .. } => p #campaign-job {
                "Rolling back with job " code { (job.as_str()) } " since " (age(*started_ms, now)) " ago: "
                (printable(reason))
            },
            _ => {},
        }
        h2 { "Rollout" }
        table #campaign-settings {
            @for (k, v) in &settings { tr { th { (k) } td { (v) } } }
            tr { th { "jobs" } td { @for (i, j) in c.jobs.iter().enumerate() { @if i > 0 { ", " } code { (j.as_str()) } } @if c.jobs.is_empty() { "none yet" } } }
            tr { th { "created" } td { (rfc3339_ms(c.created_ms)) } }
        }
        h2 { "Log" }
        table #campaign-log {
            @for l in c.log.iter().rev().take(LOG_ROWS) {
                tr { td.small { (rfc3339_ms(l.at_ms)) } td { (printable(&l.text)) } }
            }
        }
        @if hidden > 0 {
            p.muted { (hidden) " earlier lines: " code { "fleetctl ota show " (s.id) } }
        }
    };
    page(&format!("Campaign {}", s.id), body)
}

/// `/ota/<id>` for an id no campaign has.
pub fn no_campaign_page(id: &str) -> Markup {
    let body = html! {
        h1 { "No campaign " code { (printable(id)) } }
        (nav())
        p { a href="/ota" { "All campaigns" } }
    };
    page("No such campaign", body)
}

#[cfg(test)]
mod tests {
    use fleet_shared::model::JobId;
    use fleet_shared::ota::campaign::{CampaignSpec, StageState};

    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    fn rotation(id: &str) -> anyhow::Result<Campaign> {
        Ok(Campaign::rotation(CampaignSpec::rotation(id, "sensor", "1.4.2"), NOW - 600_000)?)
    }

    #[test]
    fn the_list_shows_each_campaign_change_state_and_stage_and_escapes_log_text() -> anyhow::Result<()> {
        // GIVEN a rotation in stage 2 of 3 whose last log line carries markup and a control
        // character, and a halted one
        let mut live = rotation("rot-a")?;
        live.spec.stages = vec![10, 50, 100];
        live.state = State::Stage(StageState {
            stage: 1,
            job: JobId::parse("rot-a-s2")?,
            targets: 5,
            started_ms: NOW - 60_000,
            settled_ms: None,
            last: None,
            counted: Default::default(),
        });
        (live.population, live.targeted) = (10, 6);
        live.note(NOW - 30_000, "device <b>x</b>\u{1b}[31m waits");
        let mut halted = rotation("rot-b")?;
        halted.state = State::Halted { reason: "5 of 5 failed".into() };
        // WHEN the list is rendered, with the counts of these two and 200 completed ones
        let counts =
            [("stage".into(), false, 1), ("halted".into(), false, 1), ("completed".into(), false, 200)];
        let html = campaigns_page(&[live, halted], &counts, NOW).into_string();
        // THEN each row links to its page and says what, where and how far
        for part in [
            r#"<a href="/ota/rot-a">rot-a</a>"#,
            "sensor 1.4.2: new certificates",
            ">stage<",
            ">2/3 (50%)<",
            ">6 / 10<",
            r#"class="state over">halted<"#,
            r#"id="campaigns-failed">1<"#,
            r#"id="campaigns-active">1<"#,
            r#"id="campaigns-completed">200<"#,
            r#"id="campaigns-total">202<"#,
            "2 of 202: those not ended first",
        ] {
            assert!(html.contains(part), "lacks {part}:\n{html}");
        }
        // AND the log text is neither markup nor a terminal escape
        assert!(!html.contains("<b>x") && !html.contains('\u{1b}'), "{html}");
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;"), "{html}");
        Ok(())
    }

    #[test]
    fn a_campaign_page_shows_why_it_ended_its_settings_and_only_the_newest_log_lines() -> anyhow::Result<()> {
        // GIVEN a halted rotation with more log lines than a page shows
        let mut c = rotation("rot-c")?;
        for i in 0..LOG_ROWS + 5 {
            c.note(NOW - 1_000 + i as i64, format!("line {i:03}"));
        }
        c.state = State::Halted { reason: "stage 1: 3 of 4 failed".into() };
        // WHEN its page is rendered
        let html = campaign_page(&c, NOW).into_string();
        // THEN the reason, the rollout settings (no health gate: a rotation has none) and the
        // newest lines show, and the oldest are left to fleetctl
        assert!(html.contains("Why it ended: stage 1: 3 of 4 failed"), "{html}");
        assert!(html.contains(r#"id="campaign-state">halted<"#), "{html}");
        assert!(html.contains("<th>stages</th><td>1%, 10%, 50%, 100%</td>"), "{html}");
        assert!(!html.contains("health gate"), "{html}");
        assert!(html.contains(&format!("line {:03}", LOG_ROWS + 4)), "{html}");
        assert!(!html.contains("line 000"), "{html}");
        assert!(html.contains("6 earlier lines"), "{html}");
        Ok(())
    }
}
