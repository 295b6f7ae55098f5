//! The SLOs are declared once, in `infra/slos.json`: fleet-health reads it (built in), and the
//! template's burn-rate alarms and dashboard are generated from it into the section of
//! `infra/template.yaml` between the markers below. This test fails when the two disagree;
//! `FLEET_REGENERATE=1 cargo test -p fleet-tests --test integration slo_template` rewrites the section.

use std::fmt::Write as _;

use fleet_shared::health::slo::{Catalog, SliKind};

const BEGIN: &str =
    "  # ---- BEGIN generated from infra/slos.json (tests/tests/integration/slo_template.rs): do not edit by hand\n";
const END: &str = "  # ---- END generated from infra/slos.json\n";

/// `freshness` → `Freshness`, `command-latency` → `CommandLatency`.
fn pascal(name: &str) -> String {
    name.split('-').map(|p| p[..1].to_uppercase() + &p[1..]).collect()
}

fn window_name(minutes: i64) -> String {
    // The names fleet-health gives its metrics (tested there: `window_name`).
    match minutes {
        m if m % (24 * 60) == 0 => format!("{}d", m / (24 * 60)),
        m if m % 60 == 0 => format!("{}h", m / 60),
        m => format!("{m}m"),
    }
}

fn burn_metric(out: &mut String, id: &str, slo: &str, window: &str) {
    let _ = write!(
        out,
        "        - Id: {id}
          ReturnData: false
          MetricStat:
            Metric:
              Namespace: Fleetline
              MetricName: BurnRate
              Dimensions:
                - {{ Name: Stage, Value: !Ref Stage }}
                - {{ Name: Slo, Value: {slo} }}
                - {{ Name: Cohort, Value: \"*/*/*\" }}
                - {{ Name: Window, Value: {window} }}
            Period: 60
            Stat: Maximum
"
    );
}

/// The generated section: one alarm per SLO and alert, and the dashboard.
fn render(c: &Catalog) -> String {
    let mut out = String::from(BEGIN);
    for slo in &c.slos {
        for a in &c.alerts {
            let (long, short) = (window_name(a.long_minutes), window_name(a.short_minutes));
            let _ = write!(
                out,
                "  Slo{name}{sev}Alarm:
    Type: AWS::CloudWatch::Alarm
    Properties:
      AlarmDescription: \"SLO {slo} ({pct}% over {days} days, fleet): its error budget burns faster than {rate}x over both {long} and {short} ({severity}). {desc}\"
      Metrics:
",
                name = pascal(&slo.name),
                sev = pascal(&a.severity),
                slo = slo.name,
                pct = (slo.objective * 1000.0).round() / 10.0,
                days = c.window_days,
                rate = a.burn_rate,
                severity = a.severity,
                desc = slo.description.replace('"', "'"),
            );
            burn_metric(&mut out, "long", &slo.name, &long);
            burn_metric(&mut out, "short", &slo.name, &short);
            let _ = write!(
                out,
                "        - Id: burning
          Label: both windows burning
          Expression: IF(long > {rate} AND short > {rate}, 1, 0)
          ReturnData: true
      EvaluationPeriods: 1
      Threshold: 1
      ComparisonOperator: GreaterThanOrEqualToThreshold
      TreatMissingData: notBreaching
      AlarmActions: [!If [CreateAlarmTopic, !Ref AlarmTopic, !Ref AlarmTopicArn]]
      OKActions: [!If [CreateAlarmTopic, !Ref AlarmTopic, !Ref AlarmTopicArn]]

",
                rate = a.burn_rate
            );
        }
    }
    out.push_str(&dashboard(c));
    out.push_str(END);
    out
}

/// One CloudWatch metric of the dashboard: `[namespace, name, dim, value, ...]`.
fn metric(name: &str, dims: &[(&str, &str)]) -> String {
    let mut m = format!("[\"Fleetline\",\"{name}\",\"Stage\",\"${{Stage}}\"");
    for (k, v) in dims {
        let _ = write!(m, ",\"{k}\",\"{v}\"");
    }
    m.push(']');
    m
}

/// A metric widget at `[x, y, width, height]` on the dashboard's 24-column grid.
fn widget([x, y, w, h]: [u32; 4], title: &str, view: &str, metrics: &[String], extra: &str) -> String {
    format!(
        "{{\"type\":\"metric\",\"x\":{x},\"y\":{y},\"width\":{w},\"height\":{h},\"properties\":{{\"title\":\"{title}\",\"view\":\"{view}\",\"region\":\"${{AWS::Region}}\",\"stat\":\"Maximum\",\"period\":60,\"metrics\":[{}]{extra}}}}}",
        metrics.join(",")
    )
}

/// Three rows: the executive overview (each SLO's SLI and budget left over its window), the
/// on-call view (burn rates against their alert thresholds), debugging (indicators per cohort).
fn dashboard(c: &Catalog) -> String {
    let fleet = ("Cohort", "*/*/*");
    let mut widgets = Vec::new();
    let sli: Vec<String> = c.slos.iter().map(|s| metric("Sli", &[("Slo", &s.name), fleet])).collect();
    let budget: Vec<String> =
        c.slos.iter().map(|s| metric("ErrorBudgetRemaining", &[("Slo", &s.name), fleet])).collect();
    widgets.push(widget(
        [0, 0, 12, 4],
        &format!("SLIs over {} days (fleet)", c.window_days),
        "singleValue",
        &sli,
        "",
    ));
    widgets.push(widget(
        [12, 0, 12, 4],
        "Error budget left (1 = all, below 0 = overspent)",
        "singleValue",
        &budget,
        "",
    ));
    for (i, slo) in c.slos.iter().enumerate() {
        let windows: Vec<String> = c
            .alerts
            .iter()
            .flat_map(|a| [a.short_minutes, a.long_minutes])
            .map(|w| metric("BurnRate", &[("Slo", &slo.name), fleet, ("Window", &window_name(w))]))
            .collect();
        let thresholds: Vec<String> = c
            .alerts
            .iter()
            .map(|a| format!("{{\"label\":\"{} {}x\",\"value\":{}}}", a.severity, a.burn_rate, a.burn_rate))
            .collect();
        let extra = format!(",\"annotations\":{{\"horizontal\":[{}]}}", thresholds.join(","));
        let (x, y) = ((i as u32 % 3) * 8, 4 + (i as u32 / 3) * 6);
        widgets.push(widget(
            [x, y, 8, 6],
            &format!("Burn rate: {}", slo.name),
            "timeSeries",
            &windows,
            &extra,
        ));
    }
    let debug_y = 4 + (c.slos.len() as u32).div_ceil(3) * 6;
    let indicators = [
        ("Devices active, fresh, connected", &["DevicesActive", "DevicesFresh", "DevicesConnected"][..]),
        ("Ingest error rate, reboots per device-hour", &["IngestErrorRate", "RebootsPerDeviceHour"][..]),
        (
            "Battery discharge (%/h), command latency p95 (ms)",
            &["BatteryDischargePctPerHour", "CommandLatencyP95"][..],
        ),
        (
            "DUPLICATE_CLIENTID disconnects (cloned identities), OTA success",
            &["DuplicateClientId", "OtaSuccessRate"][..],
        ),
    ];
    for (i, (title, names)) in indicators.iter().enumerate() {
        let metrics: Vec<String> = names.iter().map(|n| metric(n, &[fleet])).collect();
        widgets.push(widget(
            [(i as u32 % 2) * 12, debug_y + (i as u32 / 2) * 6, 12, 6],
            title,
            "timeSeries",
            &metrics,
            "",
        ));
    }
    // Fleet health itself.
    let own = vec![
        metric("MinutesClosed", &[("Function", "fleet-health")]),
        metric("MinutesSkipped", &[("Function", "fleet-health")]),
        metric("Cohorts", &[("Function", "fleet-health")]),
    ];
    widgets.push(widget(
        [0, debug_y + 12, 24, 4],
        "fleet-health: minutes closed, skipped; cohorts",
        "timeSeries",
        &own,
        "",
    ));
    let kinds: Vec<&str> = c
        .slos
        .iter()
        .map(|s| match s.sli {
            SliKind::Freshness => "freshness",
            SliKind::Connectivity => "connectivity",
            SliKind::IngestSuccess => "ingest_success",
            SliKind::CommandLatency => "command_latency",
            SliKind::OtaSuccess => "ota_success",
        })
        .collect();
    format!(
        "  # SLIs {}: executive overview, on-call burn rates, debugging indicators.
  HealthDashboard:
    Type: AWS::CloudWatch::Dashboard
    Properties:
      DashboardName: !Sub fleetline-${{Stage}}-fleet-health
      DashboardBody: !Sub '{{\"widgets\":[{}]}}'

",
        kinds.join(", "),
        widgets.join(",")
    )
}

#[test]
fn the_templates_slo_alarms_and_dashboard_are_generated_from_the_catalog() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");
    let template = std::fs::read_to_string(path).expect("the template");
    let catalog = Catalog::builtin();
    let want = render(&catalog);
    let (Some(a), Some(b)) = (template.find(BEGIN), template.find(END)) else {
        panic!("infra/template.yaml has no generated SLO section (markers {BEGIN:?} ... {END:?})");
    };
    let got = &template[a..b + END.len()];
    if got != want {
        if std::env::var_os("FLEET_REGENERATE").is_some() {
            let updated = format!("{}{want}{}", &template[..a], &template[b + END.len()..]);
            std::fs::write(path, updated).expect("write the template");
            return;
        }
        panic!(
            "infra/template.yaml's SLO section differs from infra/slos.json: run\n  FLEET_REGENERATE=1 cargo test -p fleet-tests --test integration slo_template"
        );
    }
    // Each SLO has one alarm per alert severity.
    for slo in &catalog.slos {
        for a in &catalog.alerts {
            assert!(got.contains(&format!("Slo{}{}Alarm:", pascal(&slo.name), pascal(&a.severity))));
        }
    }
}
