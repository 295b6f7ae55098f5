//! Server-rendered dashboard pages: HTML from maud templates (every value escaped unless marked
//! otherwise), charts drawn as SVG in Rust (plotters), no JavaScript. Pages refresh themselves
//! every few seconds. Every list a page shows is bounded, so no page grows with the fleet.

use std::collections::BTreeMap;

use fleet_shared::model::{Device, ShadowName, StoredReading, ThingName, Twin};
use fleet_shared::text::printable;
use fleet_shared::time::rfc3339_ms;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use plotters::prelude::*;
use serde_json::{Map, Value};

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
.nav{margin:0 0 1rem} .muted{color:#57606a} .drift{color:#9a6700}
code,pre{font-family:ui-monospace,monospace;font-size:.85rem} td code{overflow-wrap:anywhere}
td.more{font-style:italic}
.docs{display:flex;flex-wrap:wrap;gap:1rem} .docs section{flex:1 1 18rem}
pre{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.6rem;margin:.3rem 0;overflow:auto}
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

pub fn fleet_page(h: &FleetHealth, devices: &[Device], drifting: u64, now: i64) -> Markup {
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
        ("twins-drifting", "twins drifting", drifting.to_string()),
    ];
    let body = html! {
        h1 { "Fleetline — local fleet" }
        p.nav { a href="/twins" { "Twins drifting →" } }
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
        p.nav { a href="/" { "← fleet" } " · " a href=(twin_href(&d.thing, &ShadowName::classic())) { "its twin" } }
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

/// Drifting twins a page lists: the oldest drifts, at most this many.
pub const TWIN_ROWS: usize = 100;
/// Drifting keys shown per twin in the list; the twin's own page shows every one.
pub const KEYS_PER_TWIN: usize = 5;
/// Characters of a desired or reported value shown in the list (the twin's page shows more).
const LIST_VALUE_CHARS: usize = 60;
const PAGE_VALUE_CHARS: usize = 400;

/// The drifting twins a page shows, oldest drift first, how many drift in all (the drift
/// index's count), and whether more drift than the page shows.
#[derive(Debug, Default)]
pub struct Drifting {
    pub twins: Vec<Twin>,
    pub more: bool,
    pub total: u64,
}

impl Drifting {
    /// From the store's answer to a query for up to `TWIN_ROWS + 1` twins, oldest drift
    /// first, and the drift summary's count.
    pub fn from_oldest(mut twins: Vec<Twin>, total: u64) -> Self {
        let more = twins.len() > TWIN_ROWS;
        twins.truncate(TWIN_ROWS);
        Self { total: total.max(twins.len() as u64), twins, more }
    }

    fn count(&self) -> String {
        self.total.to_string()
    }
}

/// How long before `now_ms` something started, for people: "45 s", "3 min", "2 h 5 min",
/// "3 d 4 h". A start after `now_ms` (clock skew) is "0 s".
pub fn age(since_ms: i64, now_ms: i64) -> String {
    let s = (now_ms - since_ms).max(0) / 1000;
    let (min, h, d) = (s / 60, s / 3600, s / 86_400);
    match s {
        ..60 => format!("{s} s"),
        60..3600 => format!("{min} min"),
        3600..86_400 => format!("{h} h {} min", min % 60),
        _ => format!("{d} d {} h", h % 24),
    }
}

/// The dashboard address of a twin: `/twins/<thing>`, `?shadow=<name>` for a named shadow.
/// Thing and shadow names are URL-safe by construction (`[a-zA-Z0-9:_-]`).
fn twin_href(thing: &ThingName, shadow: &ShadowName) -> String {
    if shadow.is_classic() {
        format!("/twins/{}", thing.as_str())
    } else {
        format!("/twins/{}?shadow={}", thing.as_str(), shadow.as_str())
    }
}

fn shadow_label(shadow: &ShadowName) -> Markup {
    html! {
        @if shadow.is_classic() { span.muted { "classic" } } @else { (shadow.as_str()) }
    }
}

/// A value from a device's shadow as compact JSON, made printable, cut to `max` characters.
fn json_text(v: &Value, max: usize) -> String {
    let text = printable(&v.to_string()).into_owned();
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// A shadow section pretty-printed; each line made printable (the printer escapes control
/// characters inside strings, so every line break is its own).
fn json_document(m: &Map<String, Value>) -> String {
    let text = serde_json::to_string_pretty(m).unwrap_or_default();
    text.lines().map(printable).collect::<Vec<_>>().join("\n")
}

/// One desired value the device has not reported: its dotted path (the leaves of
/// [`Twin::drift_keys`]), the desired value, and the reported one (`None`: never reported).
#[derive(Debug, PartialEq)]
struct DriftLeaf<'a> {
    path: String,
    desired: &'a Value,
    reported: Option<&'a Value>,
}

fn drift_leaves(t: &Twin) -> Vec<DriftLeaf<'_>> {
    fn walk<'a>(
        prefix: &str,
        delta: &'a Map<String, Value>,
        reported: Option<&'a Map<String, Value>>,
        out: &mut Vec<DriftLeaf<'a>>,
    ) {
        for (k, desired) in delta {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            let reported = reported.and_then(|r| r.get(k));
            match desired {
                Value::Object(inner) if !inner.is_empty() => {
                    walk(&path, inner, reported.and_then(Value::as_object), out)
                }
                _ => out.push(DriftLeaf { path, desired, reported }),
            }
        }
    }
    let mut out = Vec::new();
    walk("", &t.delta, Some(&t.reported), &mut out);
    out
}

/// The key, desired and reported cells of one drifting key.
fn leaf_cells(leaf: &DriftLeaf<'_>, max: usize) -> Markup {
    html! {
        td.key { code { (printable(&leaf.path)) } }
        td.desired { code { (json_text(leaf.desired, max)) } }
        td.reported {
            @match leaf.reported {
                Some(v) => code { (json_text(v, max)) },
                None => span.muted { "not reported" },
            }
        }
    }
}

/// One drifting twin in the list: a row per drifting key (at most [`KEYS_PER_TWIN`], then a
/// link to the rest), the twin's own cells spanning them.
fn drifting_rows(t: &Twin, now: i64) -> Markup {
    let href = twin_href(&t.thing, &t.shadow);
    let leaves = drift_leaves(t);
    let hidden = leaves.len().saturating_sub(KEYS_PER_TWIN);
    let mut rows: Vec<Markup> =
        leaves.iter().take(KEYS_PER_TWIN).map(|l| leaf_cells(l, LIST_VALUE_CHARS)).collect();
    if hidden > 0 || rows.is_empty() {
        rows.push(html! { td.more colspan="3" { a href=(href) { "+ " (hidden) " more" } } });
    }
    let span = rows.len();
    let since = t.drift_since_ms.map(|s| format!("since {}", rfc3339_ms(s)));
    html! {
        @for (i, cells) in rows.iter().enumerate() {
            tr {
                @if i == 0 {
                    td.thing rowspan=(span) { a href=(href) { (printable(t.thing.as_str())) } }
                    td rowspan=(span) { (shadow_label(&t.shadow)) }
                    td rowspan=(span) { (t.version) }
                    td.drift rowspan=(span) title=[since.as_deref()] {
                        (t.drift_since_ms.map_or("-".into(), |s| age(s, now)))
                    }
                }
                (cells)
            }
        }
    }
}

/// `/twins`: the fleet's drifting twins, oldest drift first, one row per drifting key.
pub fn twins_page(d: &Drifting, now: i64) -> Markup {
    let oldest = d.twins.first().and_then(|t| t.drift_since_ms).map_or("-".into(), |s| age(s, now));
    let cards = [("twins-drifting", "twins drifting", d.count()), ("oldest-drift", "oldest drift", oldest)];
    let body = html! {
        p.nav { a href="/" { "← fleet" } }
        h1 { "Twins drifting" }
        div.cards { @for (id, label, value) in &cards { (card(id, label, value)) } }
        p.muted {
            "Desired values their devices have not reported, oldest drift first"
            @if d.more { "; the " (TWIN_ROWS) " oldest shown" }
            "."
        }
        @if d.twins.is_empty() {
            p #twins-none { "No twin drifts: every device reports what is desired." }
        } @else {
            table #drifting {
                tr {
                    th { "thing" } th { "shadow" } th { "version" } th { "drifting for" }
                    th { "key" } th { "desired" } th { "reported" }
                }
                @for t in &d.twins { (drifting_rows(t, now)) }
            }
        }
    };
    page("Twins", body)
}

/// `/twins/<thing>`: one twin's desired, reported and delta, its version and drift start.
pub fn twin_page(t: &Twin, now: i64) -> Markup {
    let leaves = drift_leaves(t);
    let state = if t.deleted {
        "deleted"
    } else if t.delta.is_empty() {
        "in sync"
    } else {
        "drifting"
    };
    let cards = [
        ("twin-version", "shadow version", t.version.to_string()),
        ("twin-state", "state", state.to_owned()),
        ("drift-age", "drifting for", t.drift_since_ms.map_or("-".into(), |s| age(s, now))),
        ("drift-keys", "keys drifting", leaves.len().to_string()),
    ];
    let body = html! {
        p.nav {
            a href="/twins" { "← twins drifting" } " · "
            a href={ "/devices/" (t.thing.as_str()) } { "device" }
        }
        h1 { (printable(t.thing.as_str())) " · " (shadow_label(&t.shadow)) " shadow" }
        div.cards { @for (id, label, value) in &cards { (card(id, label, value)) } }
        p.muted {
            @if let Some(s) = t.drift_since_ms { "Drifting since " (rfc3339_ms(s)) ". " }
            "Version " (t.version) " written " (rfc3339_ms(t.updated_ms)) "."
        }
        @if !leaves.is_empty() {
            h2 { "Drifting keys" }
            table #twin-drift {
                tr { th { "key" } th { "desired" } th { "reported" } }
                @for l in &leaves { tr { (leaf_cells(l, PAGE_VALUE_CHARS)) } }
            }
        }
        @if !t.diverged.is_empty() {
            h2 { "Diverged (stale-desired policies)" }
            table #twin-diverged {
                tr { th { "key" } th { "desired" } th { "reported" } th { "drifting since" } th { "policy" } }
                @for (key, d) in &t.diverged {
                    tr {
                        td.key { code { (printable(key)) } }
                        td.desired { code { (json_text(&d.desired, PAGE_VALUE_CHARS)) } }
                        td.reported {
                            @match &d.reported {
                                Some(v) => code { (json_text(v, PAGE_VALUE_CHARS)) },
                                None => span.muted { "not reported" },
                            }
                        }
                        td { (rfc3339_ms(d.since_ms)) }
                        td { (if d.released { "released" } else { d.action.as_str() }) }
                    }
                }
            }
        }
        div.docs {
            @for (id, name, section) in [("desired", "desired", &t.desired), ("reported", "reported", &t.reported), ("delta", "delta", &t.delta)] {
                section { h2 { (name) } pre id=(id) { (json_document(section)) } }
            }
        }
    };
    page(&format!("Twin {}", t.thing.as_str()), body)
}

/// `/twins/<thing>` when no twin is stored for it.
pub fn no_twin_page(thing: &ThingName, shadow: &ShadowName) -> Markup {
    let body = html! {
        p.nav { a href="/twins" { "← twins drifting" } }
        h1 { (printable(thing.as_str())) " · " (shadow_label(shadow)) " shadow" }
        p #twin-none { "No twin: no document of this shadow has been mirrored yet." }
    };
    page(&format!("Twin {}", thing.as_str()), body)
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

    /// A classic-shadow twin at version 7 whose desired is `reported` overlaid with `delta`.
    /// Built from its JSON form, so fields added to `Twin` with a serde default need no change here.
    fn twin(thing: &str, delta: Value, reported: Value, drift_since_ms: Option<i64>) -> Twin {
        let mut desired = reported.as_object().cloned().unwrap_or_default();
        desired.extend(delta.as_object().cloned().unwrap_or_default());
        let json = serde_json::json!({
            "thing": thing, "shadow": "", "version": 7, "desired": desired, "reported": reported,
            "metadata": null, "updated_ms": 1_764_000_000_000_i64, "delta": delta,
            "drift_since_ms": drift_since_ms, "deleted": false,
            "history": {"versions": {}, "deleted_at": null}, "revision": 1,
        });
        serde_json::from_value(json).expect("a twin's JSON form")
    }

    #[test]
    fn drift_age_reads_in_the_largest_useful_units() {
        let now = 1_764_000_000_000;
        let ago = |s: i64| age(now - s * 1000, now);
        assert_eq!([ago(0), ago(59), ago(60), ago(3 * 60 + 59)], ["0 s", "59 s", "1 min", "3 min"]);
        assert_eq!([ago(2 * 3600 + 5 * 60), ago(3 * 86_400 + 4 * 3600 + 59)], ["2 h 5 min", "3 d 4 h"]);
        assert_eq!(age(now + 5_000, now), "0 s", "a start in the future is no age");
    }

    #[test]
    fn drifting_list_shows_each_key_with_desired_and_reported_values_escaped() {
        // GIVEN a twin drifting for 3 minutes on a top-level key, a nested one, and a key the
        // device never reported whose desired value is markup with a direction override
        let now = 1_764_000_000_000;
        let t = twin(
            "sensor-007",
            serde_json::json!({"fw": "2.1.0", "cfg": {"mode": "eco"}, "note": "<script>x\u{202e}"}),
            serde_json::json!({"fw": "1.4.2", "cfg": {"mode": "normal", "led": true}}),
            Some(now - 200_000),
        );
        // WHEN the list is rendered
        let html = twins_page(&Drifting::from_oldest(vec![t], 1), now).into_string();
        // THEN the count, the twin's link, each key with both values, and its drift age show
        assert!(html.contains(r#"id="twins-drifting">1<"#), "{html}");
        assert!(html.contains(r#"href="/twins/sensor-007""#), "{html}");
        for cell in [
            r#"<td class="key"><code>fw</code></td><td class="desired"><code>&quot;2.1.0&quot;</code></td><td class="reported"><code>&quot;1.4.2&quot;</code>"#,
            r#"<td class="key"><code>cfg.mode</code></td><td class="desired"><code>&quot;eco&quot;</code></td><td class="reported"><code>&quot;normal&quot;</code>"#,
            r#"<td class="key"><code>note</code></td><td class="desired"><code>&quot;&lt;script&gt;x\u{202e}&quot;</code></td><td class="reported"><span class="muted">not reported</span>"#,
            ">3 min<",
            r#"<span class="muted">classic</span>"#,
        ] {
            assert!(html.contains(cell), "lacks {cell}:\n{html}");
        }
        // AND nothing the device sent is markup or a direction control
        assert!(!html.contains("<script") && !html.contains('\u{202e}'), "{html}");
    }

    #[test]
    fn drifting_list_holds_at_most_a_page_of_twins_and_keys() {
        // GIVEN one more drifting twin than a page lists, the first drifting on 8 keys
        let now = 1_764_000_000_000;
        let many: Map<String, Value> = (0..8).map(|i| (format!("k{i}"), Value::from(i))).collect();
        let twins: Vec<Twin> = (0..=TWIN_ROWS)
            .map(|i| {
                let delta = if i == 0 { Value::Object(many.clone()) } else { serde_json::json!({"fw": "2"}) };
                twin(&format!("t-{i:03}"), delta, serde_json::json!({}), Some(now - 1000))
            })
            .collect();
        // WHEN the list is rendered
        let html = twins_page(&Drifting::from_oldest(twins, 250), now).into_string();
        // THEN it lists a page of twins, says there are more, and links to the hidden keys
        assert_eq!(html.matches(r#"<td class="thing""#).count(), TWIN_ROWS);
        assert!(html.contains(r#"id="twins-drifting">250<"#) && !html.contains("t-100"), "{html}");
        assert_eq!(html.matches(r#"<td class="key">"#).count(), KEYS_PER_TWIN + TWIN_ROWS - 1);
        assert!(html.contains(r#"<a href="/twins/t-000">+ 3 more</a>"#), "{html}");
    }

    #[test]
    fn twin_page_shows_documents_version_and_drift_start() {
        // GIVEN a twin drifting on fw since a known time
        let now = 1_764_000_000_000;
        let t = twin(
            "sensor-001",
            serde_json::json!({"fw": "2.1.0"}),
            serde_json::json!({"fw": "1.4.2"}),
            Some(now - 7_200_000),
        );
        // WHEN its page is rendered
        let html = twin_page(&t, now).into_string();
        // THEN version, state, drift age and start, and the three documents show
        for part in [
            r#"id="twin-version">7<"#,
            r#"id="twin-state">drifting<"#,
            r#"id="drift-age">2 h 0 min<"#,
            "Drifting since 2025-11-24T14:00:00.000Z",
            "<pre id=\"desired\">{\n  &quot;fw&quot;: &quot;2.1.0&quot;\n}</pre>",
            "<pre id=\"reported\">{\n  &quot;fw&quot;: &quot;1.4.2&quot;\n}</pre>",
        ] {
            assert!(html.contains(part), "lacks {part}:\n{html}");
        }
        assert!(!html.contains("twin-diverged"), "no divergence, no section");
    }

    #[test]
    fn twin_page_lists_diverged_keys_with_their_policy_state() {
        // GIVEN a twin whose mode was released by a stale-desired policy
        let now = 1_764_000_000_000;
        let mut t = twin("sensor-001", serde_json::json!({}), serde_json::json!({"mode": "on"}), None);
        t.diverged.insert(
            "mode".into(),
            fleet_shared::model::Divergence {
                since_ms: now - 86_400_000,
                marked_ms: now - 3_600_000,
                desired: "eco".into(),
                reported: Some("on".into()),
                action: fleet_shared::model::StaleAction::Release,
                released: true,
            },
        );
        // WHEN its page is rendered
        let html = twin_page(&t, now).into_string();
        // THEN the key, both values, the drift start and "released" show
        for part in [
            "twin-diverged",
            "<code>mode</code>",
            "&quot;eco&quot;",
            "&quot;on&quot;",
            "2025-11-23T16:00:00.000Z",
            "<td>released</td>",
        ] {
            assert!(html.contains(part), "lacks {part}:\n{html}");
        }
    }

    #[test]
    fn device_strings_are_escaped() {
        let html = reason_table(&BTreeMap::from([("<b>\"x".to_owned(), 1)])).into_string();
        assert!(html.contains("&lt;b&gt;&quot;x") && !html.contains("<b>"), "{html}");
    }
}
