//! Server-rendered dashboard pages: HTML from maud templates (every value escaped unless marked
//! otherwise), charts drawn as SVG in Rust (plotters), no JavaScript. Pages refresh themselves
//! every few seconds.

use std::collections::BTreeMap;

use fleet_shared::model::{Device, StoredReading};
use fleet_shared::text::printable;
use fleet_shared::time::rfc3339_ms;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use plotters::prelude::*;

use crate::http::{FleetHealth, ONLINE_WINDOW_MS};

/// Readings charted on a device page: the newest ones ...
pub const CHART_POINTS: usize = 300;
/// ... within this long before the device's newest reading.
pub const CHART_SPAN_MS: i64 = 30 * 60_000;

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24;background:#f6f8fa}
h1{margin:0 0 1rem} h2{margin:2rem 0 .5rem} a{color:#0b62c4}
.cards{display:flex;flex-wrap:wrap;gap:1rem}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.8rem 1.2rem;min-width:9rem}
.card .v{font-size:1.8rem;font-weight:600} .card .k{color:#57606a;font-size:.85rem}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}
.online{color:#1a7f37} .stale{color:#9a6700} .chart{background:#fff;border:1px solid #d0d7de;margin:.5rem 0}
";

/// Every page: refreshes itself every few seconds.
fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="5";
                title { (title) " · Fleetline" }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

fn card(id: &str, label: &str, value: &str) -> Markup {
    html! { div.card { div.v id=(id) { (value) } div.k { (label) } } }
}

pub fn fleet_page(h: &FleetHealth, devices: &[Device], now: i64) -> Markup {
    let p = &h.pipeline;
    let cards = [
        ("devices-total", "devices", h.devices.to_string()),
        ("devices-online", "online (heard in 60 s)", h.online.to_string()),
        ("devices-stale", "stale", h.stale.to_string()),
        ("telemetry-freshness", "telemetry freshness", format!("{:.0}%", h.telemetry_freshness * 100.0)),
        ("messages-per-s", "messages/s (10 s)", format!("{:.1}", p.messages_per_s)),
        ("stored", "readings stored", p.metric("Accepted").to_string()),
        ("duplicates", "duplicates absorbed", p.metric("Duplicates").to_string()),
        ("quarantined-total", "quarantined", h.quarantined_by_reason.values().sum::<u64>().to_string()),
        ("refused-by-policy", "refused by the device policy", p.refused_by_policy.to_string()),
        ("payload-too-large", "over 128 KiB, refused", p.payload_too_large.to_string()),
        ("rule-errors", "rule errors (not UTF-8)", p.rule_errors.to_string()),
    ];
    let body = html! {
        h1 { "Fleetline — local fleet" }
        div.cards { @for (id, label, value) in &cards { (card(id, label, value)) } }
        h2 { "Quarantine by reason" }
        (reason_table(&h.quarantined_by_reason))
        h2 { "Devices" }
        table {
            tr { th { "thing" } th { "class" } th { "region" } th { "state" } th { "last seen" } th { "battery" } th { "fw" } }
            @for d in devices {
                @let st = d.state.as_ref();
                @let (status, seen) = match st {
                    Some(s) if now - s.last_rx_ms <= ONLINE_WINDOW_MS => ("online", rfc3339_ms(s.last_rx_ms)),
                    Some(s) => ("stale", rfc3339_ms(s.last_rx_ms)),
                    None => ("never seen", "-".to_owned()),
                };
                tr {
                    td { a href={ "/devices/" (d.thing.as_str()) } { (d.thing.as_str()) } }
                    td { (printable(d.class())) }
                    td { (printable(d.region().unwrap_or("-"))) }
                    td class=(status.replace(' ', "-")) { (status) }
                    td { (seen) }
                    td { (st.and_then(|s| s.battery_pct).map_or("-".into(), |b| format!("{b:.0}%"))) }
                    td { (printable(st.and_then(|s| s.fw.as_deref()).unwrap_or("-"))) }
                }
            }
        }
    };
    page("Fleet", body)
}

fn reason_table(by_reason: &BTreeMap<String, u64>) -> Markup {
    html! {
        @if by_reason.is_empty() {
            p #quarantine-none { "Nothing quarantined." }
        } @else {
            table #quarantine {
                tr { th { "reason" } th { "messages" } }
                @for (r, n) in by_reason { tr { td { (r) } td id={ "reason-" (r) } { (n) } } }
            }
        }
    }
}

pub fn device_page(d: &Device, readings: &[StoredReading], now: i64) -> Markup {
    let st = d.state.as_ref();
    let cards = [
        ("class", "class", printable(d.class()).into_owned()),
        ("region", "region", printable(d.region().unwrap_or("-")).into_owned()),
        ("readings", "readings charted", readings.len().to_string()),
        ("battery", "battery", st.and_then(|s| s.battery_pct).map_or("-".into(), |v| format!("{v:.0}%"))),
        (
            "last-seen",
            "last seen",
            st.map_or("-".into(), |s| format!("{} s ago", (now - s.last_rx_ms) / 1000)),
        ),
    ];
    let mut series: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    for r in readings {
        for m in &r.reading.metrics {
            series.entry(m.name.as_str()).or_default().push((r.reading.time_ms, m.value));
        }
        if let Some(bat) = r.reading.battery_pct {
            series.entry("battery %").or_default().push((r.reading.time_ms, bat));
        }
    }
    let body = html! {
        p { a href="/" { "← fleet" } }
        h1 { (d.thing.as_str()) }
        div.cards { @for (id, label, value) in &cards { (card(id, label, value)) } }
        @if series.is_empty() { p { "No telemetry yet." } }
        @for (name, points) in &series {
            h2 { (printable(name)) }
            @match chart(name, points) {
                Ok(svg) => div.chart { (svg) },
                Err(e) => p { "chart failed: " (e) },
            }
        }
    };
    page(d.thing.as_str(), body)
}

/// One metric over time as an SVG line chart (x: seconds before the newest point). The SVG is
/// drawn here from numbers; the one text from a device, the metric name, is reduced to
/// characters that need no escaping in SVG.
pub fn chart(name: &str, points: &[(i64, f64)]) -> Result<PreEscaped<String>, String> {
    let label: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '%'))
        .collect();
    let mut svg = String::new();
    {
        let last_t = points.iter().map(|p| p.0).max().unwrap_or(0);
        let xs: Vec<(f64, f64)> = points.iter().map(|(t, v)| ((t - last_t) as f64 / 1000.0, *v)).collect();
        let (x0, x1) = xs.iter().fold((0.0f64, 0.0f64), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
        let (y0, y1) = xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let pad = ((y1 - y0) * 0.1).max(0.5);
        let root = SVGBackend::with_string(&mut svg, (720, 240)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut c = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0.min(x1 - 1.0)..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("seconds before newest")
            .y_desc(label.as_str())
            .draw()
            .map_err(|e| e.to_string())?;
        c.draw_series(LineSeries::new(xs, &BLUE)).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(PreEscaped(svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_a_line() -> Result<(), String> {
        let svg = chart("temp_c", &[(0, 20.0), (1_000, 21.5), (2_000, 21.0)])?.0;
        assert!(svg.contains("<svg") && svg.contains("polyline"), "{svg}");
        let svg = chart("<script>", &[(0, 1.0)])?.0;
        assert!(!svg.contains("<script"), "{svg}");
        Ok(())
    }

    #[test]
    fn device_strings_are_escaped() {
        let html = reason_table(&BTreeMap::from([("<b>\"x".to_owned(), 1)])).into_string();
        assert!(html.contains("&lt;b&gt;&quot;x") && !html.contains("<b>"), "{html}");
    }
}
