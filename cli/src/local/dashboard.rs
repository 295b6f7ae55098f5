//! Server-rendered dashboard pages: HTML with charts drawn as SVG in Rust (plotters), no
//! JavaScript. Pages refresh themselves every few seconds.

use std::collections::BTreeMap;
use std::fmt::Write;

use fleet_shared::model::{Device, StoredReading};
use fleet_shared::time::rfc3339_ms;
use plotters::prelude::*;

use super::http::{FleetHealth, ONLINE_WINDOW_MS};

/// Readings charted on a device page: the newest ones ...
pub const CHART_POINTS: usize = 300;
/// ... within this long before the device's newest reading.
pub const CHART_SPAN_MS: i64 = 30 * 60_000;

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>{title} · Fleetline</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24;background:#f6f8fa}}
h1{{margin:0 0 1rem}} h2{{margin:2rem 0 .5rem}} a{{color:#0b62c4}}
.cards{{display:flex;flex-wrap:wrap;gap:1rem}}
.card{{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.8rem 1.2rem;min-width:9rem}}
.card .v{{font-size:1.8rem;font-weight:600}} .card .k{{color:#57606a;font-size:.85rem}}
table{{border-collapse:collapse;background:#fff}} td,th{{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}}
.online{{color:#1a7f37}} .stale{{color:#9a6700}} .chart{{background:#fff;border:1px solid #d0d7de;margin:.5rem 0}}
</style></head><body>{body}</body></html>"#
    )
}

fn card(id: &str, label: &str, value: &str) -> String {
    format!(r#"<div class="card"><div class="v" id="{id}">{value}</div><div class="k">{label}</div></div>"#)
}

pub fn fleet_page(h: &FleetHealth, devices: &[Device], now: i64) -> String {
    let p = &h.pipeline;
    let mut b = String::from("<h1>Fleetline — local fleet</h1><div class=\"cards\">");
    for (id, label, value) in [
        ("devices-total", "devices", h.devices.to_string()),
        ("devices-online", "online (heard in 60 s)", h.online.to_string()),
        ("devices-stale", "stale", h.stale.to_string()),
        ("telemetry-freshness", "telemetry freshness", format!("{:.0}%", h.telemetry_freshness * 100.0)),
        ("messages-per-s", "messages/s (10 s)", format!("{:.1}", p.messages_per_s)),
        ("stored", "readings stored", p.stored.to_string()),
        ("duplicates", "duplicates absorbed", p.duplicates.to_string()),
        ("quarantined-total", "quarantined", h.quarantined_by_reason.values().sum::<u64>().to_string()),
    ] {
        b.push_str(&card(id, label, &value));
    }
    b.push_str("</div><h2>Quarantine by reason</h2>");
    b.push_str(&reason_table(&h.quarantined_by_reason));
    b.push_str("<h2>Devices</h2><table><tr><th>thing</th><th>class</th><th>region</th><th>state</th><th>last seen</th><th>battery</th><th>fw</th></tr>");
    for d in devices {
        let (status, seen) = match &d.state {
            Some(s) if now - s.last_rx_ms <= ONLINE_WINDOW_MS => ("online", rfc3339_ms(s.last_rx_ms)),
            Some(s) => ("stale", rfc3339_ms(s.last_rx_ms)),
            None => ("never seen", "-".into()),
        };
        let st = d.state.as_ref();
        let _ = write!(
            b,
            r#"<tr><td><a href="/devices/{t}">{t}</a></td><td>{}</td><td>{}</td><td class="{}">{status}</td><td>{seen}</td><td>{}</td><td>{}</td></tr>"#,
            esc(d.class()),
            esc(d.region().unwrap_or("-")),
            status.replace(' ', "-"),
            st.and_then(|s| s.battery_pct).map_or("-".into(), |b| format!("{b:.0}%")),
            esc(st.and_then(|s| s.fw.as_deref()).unwrap_or("-")),
            t = esc(d.thing.as_str()),
        );
    }
    b.push_str("</table>");
    page("Fleet", &b)
}

fn reason_table(by_reason: &BTreeMap<String, u64>) -> String {
    if by_reason.is_empty() {
        return "<p id=\"quarantine-none\">Nothing quarantined.</p>".into();
    }
    let mut t = String::from("<table id=\"quarantine\"><tr><th>reason</th><th>messages</th></tr>");
    for (r, n) in by_reason {
        let _ = write!(t, r#"<tr><td>{}</td><td id="reason-{}">{n}</td></tr>"#, esc(r), esc(r));
    }
    t.push_str("</table>");
    t
}

pub fn device_page(d: &Device, readings: &[StoredReading], now: i64) -> String {
    let mut b =
        format!(r#"<p><a href="/">← fleet</a></p><h1>{}</h1><div class="cards">"#, esc(d.thing.as_str()));
    let st = d.state.as_ref();
    for (id, label, value) in [
        ("class", "class", d.class().to_owned()),
        ("region", "region", d.region().unwrap_or("-").to_owned()),
        ("readings", "readings charted", readings.len().to_string()),
        ("battery", "battery", st.and_then(|s| s.battery_pct).map_or("-".into(), |v| format!("{v:.0}%"))),
        (
            "last-seen",
            "last seen",
            st.map_or("-".into(), |s| format!("{} s ago", (now - s.last_rx_ms) / 1000)),
        ),
    ] {
        b.push_str(&card(id, label, &esc(&value)));
    }
    b.push_str("</div>");
    let mut series: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    for r in readings {
        for m in &r.reading.metrics {
            series.entry(m.name.as_str()).or_default().push((r.reading.time_ms, m.value));
        }
        if let Some(bat) = r.reading.battery_pct {
            series.entry("battery %").or_default().push((r.reading.time_ms, bat));
        }
    }
    if series.is_empty() {
        b.push_str("<p>No telemetry yet.</p>");
    }
    for (name, points) in &series {
        let _ = write!(b, "<h2>{}</h2>", esc(name));
        b.push_str(&chart(name, points).unwrap_or_else(|e| format!("<p>chart failed: {}</p>", esc(&e))));
    }
    page(d.thing.as_str(), &b)
}

/// One metric over time as an SVG line chart (x: seconds before the newest point).
pub fn chart(name: &str, points: &[(i64, f64)]) -> Result<String, String> {
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
        c.configure_mesh().x_desc("seconds before newest").y_desc(name).draw().map_err(|e| e.to_string())?;
        c.draw_series(LineSeries::new(xs, &BLUE)).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(format!(r#"<div class="chart">{svg}</div>"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_a_line() -> Result<(), String> {
        let svg = chart("temp_c", &[(0, 20.0), (1_000, 21.5), (2_000, 21.0)])?;
        assert!(svg.contains("<svg") && svg.contains("polyline"), "{svg}");
        Ok(())
    }

    #[test]
    fn escapes_html() {
        assert_eq!(esc("<a href=\"x\">&</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;");
    }
}
