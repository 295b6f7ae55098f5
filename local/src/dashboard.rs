//! Server-rendered dashboard pages: HTML from maud templates (every value escaped unless marked
//! otherwise), charts drawn as SVG in Rust (plotters), no JavaScript. Pages refresh themselves
//! every few seconds. Every list a page shows is bounded, so no page grows with the fleet.

use std::collections::{BTreeMap, BTreeSet};

use fleet_health::handler::window_name;
use fleet_shared::health::ledger::{window, CohortHealth, HealthReport, SloStatus};
use fleet_shared::health::slo::{BurnAlert, Catalog, Events, Slo};
use fleet_shared::health::tally::{Cohort, Tally, MINUTE_MS};
use fleet_shared::model::{Device, ShadowName, StoredReading, ThingName, Twin};
use fleet_shared::text::printable;
use fleet_shared::time::rfc3339_ms;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::http::{FleetHealth, ONLINE_WINDOW_MS};

pub mod ota;

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
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.desc{color:#57606a;font-size:.8rem} .small{font-size:.75rem}
.over{color:#cf222e;font-weight:600} .burn-page{background:#ffebe9} .burn-ticket{background:#fff8c5}
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.8rem;font-weight:600;color:#fff;background:#57606a}
.badge.page{background:#cf222e} .badge.ticket{background:#9a6700}
.charts{display:flex;flex-wrap:wrap;gap:0 .8rem} h3{margin:1.2rem 0 .2rem} h3 code{font-size:1rem}
table.slo{width:100%;max-width:78rem} table.slo td:first-child{width:30%} td.alerts{white-space:nowrap}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:8px;padding:.5rem .8rem}
";

/// Every page: refreshes itself every few seconds.
fn page(title: &str, body: Markup) -> Markup {
    page_every(title, 5, body)
}

/// A page that refreshes itself every `refresh_s` seconds.
fn page_every(title: &str, refresh_s: u32, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(refresh_s);
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
        p.nav {
            a href="/twins" { "Twins drifting →" } " · " a href="/slo" { "SLOs →" } " · "
            a href="/ota" { "OTA campaigns →" }
        }
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

/// The SLO charts: the fleet's SLI per [`SLO_CHART_STEP`] minutes over the last
/// [`SLO_CHART_MINUTES`], computed from its ledger rows, and the page alert's burn rates.
pub const SLO_CHART_MINUTES: i64 = 6 * 60;
pub const SLO_CHART_STEP: i64 = 5;
/// Cohorts the SLO page lists below the fleet, alerting ones first (`/api/slo` has the rest).
pub const SLO_COHORTS: usize = 50;
/// A report older than this comes from a fleet-health that stopped running.
const SLO_REPORT_STALE_MS: i64 = 3 * MINUTE_MS;
/// The SLO page changes once a minute; no need to redraw it every few seconds.
const SLO_REFRESH_S: u32 = 30;

/// The fleet's cumulative ledger rows the SLO charts are drawn from, by the minute asked for
/// ([`slo_chart_minutes`]): the newest row at or before it, `None` before the ledger's first.
pub type LedgerSamples = BTreeMap<i64, Option<Tally>>;

/// The alert whose windows the burn-rate charts show: `page` (else the catalog's first alert).
fn charted_alert(catalog: &Catalog) -> Option<&BurnAlert> {
    catalog.alerts.iter().find(|a| a.severity == "page").or(catalog.alerts.first())
}

/// The minutes ending each charted step of a report closed at `end`, oldest first.
fn chart_steps(end: i64) -> impl Iterator<Item = i64> {
    (0..=SLO_CHART_MINUTES / SLO_CHART_STEP).map(move |k| end - SLO_CHART_MINUTES + k * SLO_CHART_STEP)
}

/// The minutes whose ledger rows [`slo_page`] charts for a report closed at `end`: each step's
/// end, and the start of each window charted there (the step, the page alert's two windows).
pub fn slo_chart_minutes(catalog: &Catalog, end: i64) -> BTreeSet<i64> {
    let mut windows = vec![0, SLO_CHART_STEP];
    windows.extend(charted_alert(catalog).into_iter().flat_map(|a| [a.short_minutes, a.long_minutes]));
    chart_steps(end).flat_map(|m| windows.iter().map(move |w| m - w).collect::<Vec<_>>()).collect()
}

/// An SLO's events over the `minutes` ending with minute `m`; `None` when a row it needs was
/// not read or the cohort had no row yet by `m`.
fn events_over(slo: &Slo, rows: &LedgerSamples, m: i64, minutes: i64) -> Option<Events> {
    let head = rows.get(&m)?.as_ref()?;
    let start = rows.get(&(m - minutes))?;
    Some(slo.events(&window(head, start.as_ref())))
}

/// A value per charted step: (hours before the end, value), `None` where there is none.
type Series = Vec<(f64, Option<f64>)>;

fn series(end: i64, value: impl Fn(i64) -> Option<f64>) -> Series {
    chart_steps(end).map(|m| ((m - end) as f64 / 60.0, value(m))).collect()
}

/// The SLI per step: good / total events in the step, none without events.
fn sli_series(slo: &Slo, rows: &LedgerSamples, end: i64) -> Series {
    series(end, |m| events_over(slo, rows, m, SLO_CHART_STEP)?.ratio())
}

/// The burn rate over the `minutes` ending at each step, none without events.
fn burn_series(slo: &Slo, rows: &LedgerSamples, end: i64, minutes: i64) -> Series {
    series(end, |m| slo.burn_rate(events_over(slo, rows, m, minutes)?))
}

/// The runs of consecutive values: each is drawn as its own line, so missing data is a gap.
fn runs(points: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![];
    let mut run = vec![];
    for &(x, y) in points {
        match y {
            Some(y) => run.push((x, y)),
            None if !run.is_empty() => out.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

/// A line of a chart: its legend, colour, width and values (gaps where `None`).
struct Line<'a> {
    label: String,
    color: RGBColor,
    width: u32,
    dashed: bool,
    points: &'a [(f64, Option<f64>)],
}

const INK: RGBColor = RGBColor(11, 98, 196);
const PALE_INK: RGBColor = RGBColor(120, 170, 230);
const ALERT_RED: RGBColor = RGBColor(207, 34, 46);

/// Digits after the point a percent axis needs to tell its labels apart.
fn percent_decimals(span: f64) -> usize {
    match span {
        s if s <= 1.0 => 2,
        s if s <= 10.0 => 1,
        _ => 0,
    }
}

/// A chart of the last [`SLO_CHART_MINUTES`] (x: hours before `end_label`): each line's runs
/// drawn separately, a lone value as a dot, a legend. No text in it comes from a device.
fn steps_chart(
    y_desc: &str,
    y: std::ops::Range<f64>,
    y_label: &dyn Fn(&f64) -> String,
    lines: &[Line<'_>],
    legend: SeriesLabelPosition,
    end_label: &str,
) -> Result<PreEscaped<String>, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 240)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let x0 = -(SLO_CHART_MINUTES as f64) / 60.0;
        let mut c = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(62)
            .build_cartesian_2d(x0..0.0, y)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_labels(7)
            .x_label_formatter(&|h| format!("{:.0} h", h.abs()))
            .x_desc(format!("hours before {end_label}"))
            .y_desc(y_desc)
            .y_label_formatter(y_label)
            .light_line_style(RGBColor(240, 242, 244))
            .draw()
            .map_err(|e| e.to_string())?;
        let mut labelled = false;
        for line in lines {
            let style = ShapeStyle::from(line.color).stroke_width(line.width);
            for (i, run) in runs(line.points).into_iter().enumerate() {
                let drawn = if line.dashed {
                    c.draw_series(DashedLineSeries::new(run.clone(), 6, 4, style))
                } else if run.len() == 1 {
                    c.draw_series(run.iter().map(|p| Circle::new(*p, 2, style.filled())))
                } else {
                    c.draw_series(LineSeries::new(run.clone(), style))
                }
                .map_err(|e| e.to_string())?;
                if i == 0 {
                    labelled = true;
                    drawn
                        .label(line.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
            }
        }
        if labelled {
            c.configure_series_labels()
                .position(legend)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(208, 215, 222))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(PreEscaped(svg))
}

/// The SLI per step in percent, against the objective (a dashed line).
fn sli_chart(slo: &Slo, sli: &Series, end_label: &str) -> Result<PreEscaped<String>, String> {
    let pct: Series = sli.iter().map(|(x, v)| (*x, v.map(|v| v * 100.0))).collect();
    let objective = slo.objective * 100.0;
    // From a little below the objective (twice the budget) or the lowest value, to 100 %.
    let low = pct.iter().filter_map(|p| p.1).fold(objective - 2.0 * (100.0 - objective), f64::min);
    let span = 100.0 - low.max(0.0);
    let lo = (low - span * 0.05).max(0.0);
    let decimals = percent_decimals(100.0 - lo);
    let target = [(-(SLO_CHART_MINUTES as f64) / 60.0, Some(objective)), (0.0, Some(objective))];
    let lines = [
        Line {
            label: format!("SLI per {}", window_name(SLO_CHART_STEP)),
            color: INK,
            width: 2,
            dashed: false,
            points: &pct,
        },
        Line {
            label: format!("objective {}", objective_text(slo.objective)),
            color: ALERT_RED,
            width: 1,
            dashed: true,
            points: &target,
        },
    ];
    // An SLI mostly sits near the top: the legend goes below it.
    let legend = SeriesLabelPosition::LowerLeft;
    steps_chart("SLI", lo..100.0, &|v| format!("{v:.decimals$}%"), &lines, legend, end_label)
}

/// The page alert's two burn rates per step, against its threshold (a dashed line).
fn burn_chart(
    alert: &BurnAlert,
    long: &Series,
    short: &Series,
    end_label: &str,
) -> Result<PreEscaped<String>, String> {
    let top = long.iter().chain(short).filter_map(|p| p.1).fold(alert.burn_rate, f64::max) * 1.15;
    let threshold =
        [(-(SLO_CHART_MINUTES as f64) / 60.0, Some(alert.burn_rate)), (0.0, Some(alert.burn_rate))];
    let lines = [
        Line {
            label: format!("burn rate {}", window_name(alert.short_minutes)),
            color: PALE_INK,
            width: 1,
            dashed: false,
            points: short,
        },
        Line {
            label: format!("burn rate {}", window_name(alert.long_minutes)),
            color: INK,
            width: 2,
            dashed: false,
            points: long,
        },
        Line {
            label: format!("{} above {} on both", alert.severity, alert.burn_rate),
            color: ALERT_RED,
            width: 1,
            dashed: true,
            points: &threshold,
        },
    ];
    let decimals = if top < 5.0 { 1 } else { 0 };
    // A burn rate mostly sits near zero: the legend goes above it.
    let legend = SeriesLabelPosition::UpperLeft;
    steps_chart("burn rate (× budget)", 0.0..top, &|v| format!("{v:.decimals$}"), &lines, legend, end_label)
}

/// An objective in percent, as few digits as it needs: `95%`, `99.9%`.
fn objective_text(objective: f64) -> String {
    format!("{}%", (objective * 100_000.0).round() / 1000.0)
}

/// An SLI in percent to two places, never rounded up to 100 % when not every event was good.
fn sli_text(sli: Option<f64>) -> String {
    match sli {
        None => "–".to_owned(),
        Some(v) if v >= 1.0 => "100%".to_owned(),
        Some(v) => {
            let s = format!("{:.2}", v * 100.0);
            if s == "100.00" {
                "99.99%".to_owned()
            } else {
                format!("{s}%")
            }
        }
    }
}

/// A burn rate: two places below 10, one below 100, none above.
fn burn_text(rate: Option<f64>) -> String {
    match rate {
        None => "–".to_owned(),
        Some(r) if r.abs() < 10.0 => format!("{r:.2}"),
        Some(r) if r.abs() < 100.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// The most severe alert (catalog order) that uses window `minutes` and whose rate `rate`
/// exceeds: the cell is shaded for it (shaded is not firing: that needs both windows).
fn burn_class(catalog: &Catalog, minutes: i64, rate: Option<f64>) -> Option<&'static str> {
    let rate = rate?;
    let alert = catalog
        .alerts
        .iter()
        .find(|a| (a.long_minutes == minutes || a.short_minutes == minutes) && rate > a.burn_rate)?;
    Some(if alert.severity == "page" { "burn-page" } else { "burn-ticket" })
}

fn badge(severity: &str) -> Markup {
    let class = match severity {
        "page" => "badge page",
        "ticket" => "badge ticket",
        _ => "badge",
    };
    html! { span class=(class) { (severity) } }
}

fn alerting(h: &CohortHealth) -> bool {
    h.slos.iter().any(|s| !s.firing.is_empty())
}

/// `14:06 UTC`: the end of minute `minute` (Unix minute), for people.
fn minute_end_text(minute: i64) -> String {
    let t = rfc3339_ms((minute + 1) * MINUTE_MS);
    format!("{} UTC", t.get(11..16).unwrap_or(&t))
}

/// One SLO's row; its description under its name, or (`described` false) as its tooltip.
fn slo_row(catalog: &Catalog, s: &SloStatus, windows: &[i64], described: bool) -> Markup {
    let description = catalog.slo(&s.slo).map(|d| d.description.as_str());
    let rate = |w: i64| s.burn_rates.iter().find(|(x, _)| *x == w).and_then(|(_, r)| *r);
    html! {
        tr {
            td title=[description.filter(|_| !described)] {
                strong { (s.slo) }
                @if let Some(d) = description.filter(|_| described) { br; span.desc { (d) } }
            }
            td.num { (objective_text(s.objective)) }
            td.num title="good / total events" {
                (sli_text(s.sli)) br;
                span.muted.small { (s.good) " / " (s.total) }
            }
            td.num.over[s.budget_remaining < 0.0] { (format!("{:.1}%", s.budget_remaining * 100.0)) }
            @for w in windows {
                @let r = rate(*w);
                @let hot = burn_class(catalog, *w, r);
                td.num.burn-page[hot == Some("burn-page")].burn-ticket[hot == Some("burn-ticket")] { (burn_text(r)) }
            }
            td.alerts {
                @if s.firing.is_empty() { span.muted { "none" } }
                @for (i, a) in s.firing.iter().enumerate() { @if i > 0 { " " } (badge(a)) }
            }
        }
    }
}

/// One cohort's SLOs: a row each, with the SLOs' descriptions when `described`.
fn slo_table(catalog: &Catalog, h: &CohortHealth, id: Option<&str>, described: bool) -> Markup {
    let windows = catalog.windows();
    html! {
        table.slo id=[id] {
            tr {
                th { "SLO" } th { "objective" } th { "SLI " (window_name(catalog.window_minutes())) }
                th { "error budget left" }
                @for w in &windows { th.num { "burn " (window_name(*w)) } }
                th { "alerts" }
            }
            @for s in &h.slos { (slo_row(catalog, s, &windows, described)) }
        }
    }
}

/// The fleet's charts: per SLO, its SLI per step against the objective and the page alert's
/// burn rates against its threshold; a note instead for an SLO without events in the span.
fn fleet_charts(catalog: &Catalog, rows: &LedgerSamples, end: i64) -> Markup {
    let end_label = minute_end_text(end);
    let alert = charted_alert(catalog);
    let span = window_name(SLO_CHART_MINUTES);
    html! {
        @for slo in &catalog.slos {
            @let sli = sli_series(slo, rows, end);
            h3 { (slo.name) }
            @if sli.iter().all(|p| p.1.is_none()) {
                p.muted.no-events { "No " (slo.name) " events in the last " (span) ": nothing to chart." }
            } @else {
                div.charts {
                    @match sli_chart(slo, &sli, &end_label) {
                        Ok(svg) => div.chart { (svg) },
                        Err(e) => p { "chart failed: " (e) },
                    }
                    @if let Some(a) = alert {
                        @let long = burn_series(slo, rows, end, a.long_minutes);
                        @let short = burn_series(slo, rows, end, a.short_minutes);
                        @match burn_chart(a, &long, &short, &end_label) {
                            Ok(svg) => div.chart { (svg) },
                            Err(e) => p { "chart failed: " (e) },
                        }
                    }
                }
            }
        }
    }
}

fn slo_nav() -> Markup {
    html! { p.nav { a href="/" { "← fleet" } " · " a href="/twins" { "twins drifting" } } }
}

/// `/slo`: fleet-health's last evaluation. The fleet's SLOs (with charts of the last
/// [`SLO_CHART_MINUTES`] from `fleet_rows`), then each class in each region (at most
/// [`SLO_COHORTS`], alerting ones first).
pub fn slo_page(catalog: &Catalog, report: &HealthReport, fleet_rows: &LedgerSamples, now: i64) -> Markup {
    let fleet = report.cohorts.iter().find(|h| h.cohort == Cohort::fleet());
    let mut others: Vec<&CohortHealth> =
        report.cohorts.iter().filter(|h| h.cohort != Cohort::fleet()).collect();
    others.sort_by(|a, b| alerting(b).cmp(&alerting(a)).then_with(|| a.cohort.cmp(&b.cohort)));
    let hidden = others.len().saturating_sub(SLO_COHORTS);
    let hidden_alerting = others.iter().skip(SLO_COHORTS).filter(|h| alerting(h)).count();
    others.truncate(SLO_COHORTS);
    let firing: usize = report.cohorts.iter().flat_map(|h| &h.slos).map(|s| s.firing.len()).sum();
    let devices = fleet.map(|h| &h.last_hour);
    let figure = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
    let cards = [
        ("slo-alerts", "alerts firing (all cohorts)", firing.to_string()),
        ("slo-active", "devices active (24 h)", figure(devices.map(|d| d.devices_active))),
        ("slo-fresh", "fresh (data in 2 min)", figure(devices.map(|d| d.devices_fresh))),
        ("slo-connected", "connected", figure(devices.map(|d| d.devices_connected))),
        ("slo-evaluated", "evaluated", format!("{} ago", age(report.computed_at_ms, now))),
    ];
    let body = html! {
        (slo_nav())
        h1 { "Service level objectives" }
        @if now - report.computed_at_ms > SLO_REPORT_STALE_MS {
            p.warn #slo-stale {
                "fleet-health last ran " (age(report.computed_at_ms, now)) " ago (it runs every minute): "
                "these figures are from then."
            }
        }
        div.cards { @for (id, label, value) in &cards { (card(id, label, value)) } }
        p.muted {
            "Through " (minute_end_text(report.minute)) ". SLIs and error budgets over "
            (window_name(catalog.window_minutes())) "; a burn rate of 1 spends the budget in exactly that window. "
            @for (i, a) in catalog.alerts.iter().enumerate() {
                @if i > 0 { "; " }
                (badge(&a.severity)) " when the " (window_name(a.long_minutes)) " and "
                (window_name(a.short_minutes)) " burn rates both exceed " (a.burn_rate)
            }
            ". A shaded burn rate is over the threshold of an alert on its window."
        }
        h2 { "Fleet " code { (Cohort::fleet()) } }
        @match fleet {
            Some(h) => {
                (slo_table(catalog, h, Some("slo-fleet"), true))
                h2 { "Fleet, last " (window_name(SLO_CHART_MINUTES)) }
                p.muted {
                    "Each SLI per " (window_name(SLO_CHART_STEP)) " from the SLO ledger; gaps where nothing was counted."
                }
                (fleet_charts(catalog, fleet_rows, report.minute))
            },
            None => p #slo-fleet-none { "No fleet figures in this evaluation: no device has counted anything yet." },
        }
        h2 { "By class and region" }
        @if others.is_empty() { p.muted { "No class and region has counted anything yet." } }
        @for h in &others {
            h3 { code { (h.cohort) } }
            (slo_table(catalog, h, None, false))
        }
        @if hidden > 0 {
            p.muted #slo-more {
                (hidden) " more cohorts not shown (" (hidden_alerting) " of them alerting): "
                a href="/api/slo" { "/api/slo" } " lists them."
            }
        }
    };
    page_every("SLOs", SLO_REFRESH_S, body)
}

/// `/slo` before fleet-health has stored its first evaluation.
pub fn no_slo_page() -> Markup {
    let body = html! {
        (slo_nav())
        h1 { "Service level objectives" }
        p #slo-none { "fleet-health has not run yet: it runs every minute." }
        p.muted { "This page fills in once it has closed a minute of what the devices sent." }
    };
    page_every("SLOs", SLO_REFRESH_S, body)
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

    /// The fleet's cumulative rows as fleet-health writes them: each minute of `minutes` adds
    /// `fresh` of 10 active device-minutes; the samples are what `row_at` answers at each
    /// minute [`slo_chart_minutes`] asks for.
    fn ledger(catalog: &Catalog, end: i64, minutes: &[(i64, i64)]) -> LedgerSamples {
        let mut rows: BTreeMap<i64, Tally> = BTreeMap::new();
        let mut sum = Tally::default();
        for &(m, fresh) in minutes {
            sum.add(fleet_shared::health::tally::counter::FRESH_MINUTES, fresh);
            sum.add(fleet_shared::health::tally::counter::ACTIVE_MINUTES, 10);
            rows.insert(m, sum.clone());
        }
        slo_chart_minutes(catalog, end)
            .into_iter()
            .map(|m| (m, rows.range(..=m).next_back().map(|(_, t)| t.clone())))
            .collect()
    }

    #[test]
    fn slo_charts_leave_gaps_where_the_ledger_counted_nothing() {
        // GIVEN a ledger that starts 2 hours before the end, 9 of 10 devices fresh each minute,
        // with nothing counted for the 20 minutes from 60 minutes before the end
        let catalog = Catalog::builtin();
        let freshness = catalog.slo("freshness").expect("freshness is in the catalog");
        let end = 29_000_000;
        let minutes: Vec<(i64, i64)> =
            (end - 120..=end).filter(|m| !(end - 60..end - 40).contains(m)).map(|m| (m, 9)).collect();
        let rows = ledger(&catalog, end, &minutes);
        // WHEN the SLI per 5 minutes is charted over 6 hours
        let sli = sli_series(freshness, &rows, end);
        // THEN there is a value per 5-minute step, 90 % where minutes were counted ...
        assert_eq!(sli.len() as i64, SLO_CHART_MINUTES / SLO_CHART_STEP + 1);
        let at = |minutes_before: i64| sli[((SLO_CHART_MINUTES - minutes_before) / SLO_CHART_STEP) as usize];
        assert_eq!(at(0), (0.0, Some(0.9)));
        assert_eq!(at(30), (-0.5, Some(0.9)));
        // ... and none before the ledger's first row or in the steps with nothing counted
        assert_eq!(at(125).1, None);
        assert_eq!(at(50).1, None);
        assert_eq!(at(45).1, None);
        assert_eq!(at(40).1, Some(0.9), "the step ending 40 min before holds its one counted minute");
        // AND the values are drawn as separate lines across the gap
        let runs = runs(&sli);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(runs.iter().flatten().all(|p| p.1 == 0.9));
        // AND the 1 h burn rate is 2 (10 % bad of a 5 % budget) wherever an hour holds events
        let burn = burn_series(freshness, &rows, end, 60);
        assert!(burn.iter().filter_map(|p| p.1).all(|b| (b - 2.0).abs() < 1e-9));
        assert_eq!(burn.iter().filter(|p| p.1.is_some()).count(), 25, "steps from 2 h before the end");
    }

    #[test]
    fn slo_figures_read_as_percent_and_never_round_up_to_perfect() {
        assert_eq!([objective_text(0.95), objective_text(0.999)], ["95%", "99.9%"]);
        assert_eq!([sli_text(Some(0.9)), sli_text(Some(1.0)), sli_text(None)], ["90.00%", "100%", "–"]);
        assert_eq!(sli_text(Some(0.999_99)), "99.99%", "not every event was good");
        assert_eq!(
            [burn_text(Some(2.0)), burn_text(Some(14.4)), burn_text(Some(999.6))],
            ["2.00", "14.4", "1000"]
        );
        assert_eq!(minute_end_text(29_000_000), "21:21 UTC", "the end of minute 21:20");
    }

    #[test]
    fn slo_page_lists_alerting_cohorts_first_and_at_most_a_page_of_them() {
        // GIVEN a report of more class/region cohorts than the page lists, the last one paging
        let catalog = Catalog::builtin();
        let status = |firing: &[&str]| SloStatus {
            slo: "freshness".into(),
            objective: 0.95,
            sli: Some(0.9),
            good: 9,
            total: 10,
            budget_remaining: -1.0,
            burn_rates: vec![(5, Some(20.0)), (60, Some(15.0))],
            firing: firing.iter().map(|f| f.to_string()).collect(),
        };
        let cohorts: Vec<CohortHealth> = (0..=SLO_COHORTS)
            .map(|i| CohortHealth {
                cohort: Cohort::new(&format!("class-{i:03}"), "eu-west", Cohort::ANY),
                minute: 29_000_000,
                slos: vec![status(if i == SLO_COHORTS { &["page"] } else { &[] })],
                last_hour: Default::default(),
            })
            .collect();
        let report = HealthReport { minute: 29_000_000, computed_at_ms: 29_000_001 * MINUTE_MS, cohorts };
        // WHEN the page is rendered
        let html = slo_page(&catalog, &report, &LedgerSamples::new(), 29_000_002 * MINUTE_MS).into_string();
        // THEN the paging cohort comes first, a page of cohorts is listed, and the rest counted
        let first = html.find("class-050/eu-west/*").expect("the paging cohort is listed");
        assert!(first < html.find("class-000/eu-west/*").expect("the first cohort is listed"), "{html}");
        assert!(!html.contains("class-049/eu-west/*"), "{html}");
        assert!(html.contains("1 more cohorts not shown (0 of them alerting)"), "{html}");
        assert!(html.contains(r#"<span class="badge page">page</span>"#), "{html}");
        // AND burn rates over an alert's threshold are shaded, an overspent budget is red
        assert!(html.contains(r#"<td class="num burn-page">20.0</td>"#), "{html}");
        assert!(html.contains(r#"<td class="num over">-100.0%</td>"#), "{html}");
        // AND without fleet figures it says so instead of charting
        assert!(html.contains("slo-fleet-none") && !html.contains("<svg"), "{html}");
    }

    #[test]
    fn slo_charts_are_svg_with_the_objective_and_the_page_threshold() -> Result<(), String> {
        // GIVEN an SLI dipping to 50 % in one step and burning fast there
        let catalog = Catalog::builtin();
        let slo = catalog.slo("freshness").ok_or("no freshness SLO")?;
        let alert = charted_alert(&catalog).ok_or("no alert")?;
        let sli: Series = vec![(-1.0, Some(0.99)), (-0.5, Some(0.5)), (0.0, None)];
        let burn: Series = vec![(-1.0, Some(0.2)), (-0.5, Some(10.0)), (0.0, None)];
        // WHEN both are charted
        let sli_svg = sli_chart(slo, &sli, "10:41 UTC")?.0;
        let burn_svg = burn_chart(alert, &burn, &burn, "10:41 UTC")?.0;
        // THEN each is an SVG with its lines, legend and percent or burn axis
        assert!(sli_svg.starts_with("<svg") && sli_svg.contains("objective 95%"), "{sli_svg}");
        assert!(sli_svg.contains("50%") && sli_svg.contains("hours before 10:41 UTC"), "{sli_svg}");
        assert!(
            burn_svg.contains("page above 14.4 on both") && burn_svg.contains("burn rate 1h"),
            "{burn_svg}"
        );
        Ok(())
    }

    #[test]
    fn device_strings_are_escaped() {
        let html = reason_table(&BTreeMap::from([("<b>\"x".to_owned(), 1)])).into_string();
        assert!(html.contains("&lt;b&gt;&quot;x") && !html.contains("<b>"), "{html}");
    }
}
