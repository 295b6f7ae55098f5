//! Printing: stable JSON with `--json`, aligned tables without.

use std::path::Path;

use anyhow::Result;
use fleet_shared::ingest::{BatchOutcome, QuarantineLine, ReplayReport};
use fleet_shared::model::{
    AllowlistEntry, Certificate, CertificateId, Device, Enrolment, ShadowName, StoredReading, ThingName, Twin,
};
use fleet_shared::ports::AuditEvent;
use fleet_shared::text::printable;
use fleet_shared::time::rfc3339_ms;
use fleet_shared::twin::policy::StalePolicy;
use fleet_shared::twin::write::WriteOutcome;
use serde_json::json;

/// Write one line to stdout; a closed pipe (`| head`) surfaces as an error, not a panic.
fn emit(line: &str) -> Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    emit(&serde_json::to_string_pretty(v)?)
}

/// Print rows under a header, each column as wide as its widest cell. Every cell is shown
/// through `printable`: device-supplied text never reaches the terminal as control characters.
fn table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| r.iter().map(|c| printable(c).into_owned()).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        emit(padded.join("  ").trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn device_row(d: &Device) -> Vec<String> {
    let reg = d.registration.as_ref();
    let state = d.state.as_ref();
    vec![
        d.thing.to_string(),
        d.class().to_owned(),
        opt(d.region()),
        opt(state.and_then(|s| s.fw.as_deref()).or(reg.map(|r| r.fw.as_str()))),
        opt(state.and_then(|s| s.battery_pct)),
        opt(state.map(|s| rfc3339_ms(s.last_rx_ms))),
    ]
}

const DEVICE_HEADER: [&str; 6] = ["THING", "CLASS", "REGION", "FW", "BATTERY", "LAST SEEN"];

pub fn devices(devices: &[Device], json: bool) -> Result<()> {
    if json {
        return print_json(&devices);
    }
    table(&DEVICE_HEADER, &devices.iter().map(device_row).collect::<Vec<_>>())
}

pub fn device(d: &Device, json: bool) -> Result<()> {
    if json {
        return print_json(d);
    }
    table(&DEVICE_HEADER, &[device_row(d)])
}

pub fn readings(readings: &[StoredReading], json: bool) -> Result<()> {
    if json {
        return print_json(&readings);
    }
    let rows: Vec<Vec<String>> = readings
        .iter()
        .map(|s| {
            let r = &s.reading;
            let mut flags = Vec::new();
            if r.flags.skew_corrected {
                flags.push("skew");
            }
            if r.test {
                flags.push("test");
            }
            vec![
                rfc3339_ms(r.time_ms),
                format!("{}/{}", r.id.boot, r.id.seq),
                s.class.clone(),
                r.metrics.iter().map(|m| format!("{}={}", m.name, m.value)).collect::<Vec<_>>().join(" "),
                opt(r.battery_pct),
                flags.join(","),
            ]
        })
        .collect();
    table(&["TIME", "BOOT/SEQ", "CLASS", "METRICS", "BATTERY", "FLAGS"], &rows)
}

pub fn quarantine(lines: &[QuarantineLine], json: bool) -> Result<()> {
    if json {
        return print_json(&lines);
    }
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|q| {
            vec![
                rfc3339_ms(q.received_ms),
                opt(q.thing.as_deref()),
                opt(q.topic.as_deref()),
                q.reasons.iter().map(|p| p.reason.as_str()).collect::<Vec<_>>().join(","),
                q.reasons.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>().join("; "),
            ]
        })
        .collect();
    table(&["RECEIVED", "THING", "TOPIC", "REASONS", "DETAIL"], &rows)
}

pub fn ingest_outcome(file: &Path, o: &BatchOutcome, json: bool) -> Result<()> {
    let quarantined: Vec<_> = o
        .quarantined
        .iter()
        .map(|q| json!({"message_id": q.message_id, "reasons": q.problems.iter().map(|p| p.reason).collect::<Vec<_>>()}))
        .collect();
    let summary = json!({
        "file": file.display().to_string(),
        "messages": o.messages,
        "accepted": o.accepted,
        "duplicates": o.duplicates,
        "late": o.late,
        "skew_corrected": o.skew_corrected,
        "unregistered": o.unregistered,
        "quarantined": quarantined,
        "failed": o.failed.len(),
    });
    if json {
        return print_json(&summary);
    }
    emit(&format!(
        "{}: {} messages, {} accepted, {} duplicates, {} quarantined, {} failed (skew-corrected {}, late {}, unregistered {})",
        file.display(),
        o.messages,
        o.accepted,
        o.duplicates,
        o.quarantined.len(),
        o.failed.len(),
        o.skew_corrected,
        o.late,
        o.unregistered
    ))?;
    for q in &o.quarantined {
        let reasons: Vec<&str> = q.problems.iter().map(|p| p.reason.as_str()).collect();
        emit(&format!("  quarantined {}: {}", q.message_id, reasons.join(", ")))?;
    }
    Ok(())
}

pub fn replay(r: &ReplayReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    emit(&format!(
        "replayed {} archive objects, {} messages: {} stored, {} duplicates, {} late, {} quarantined, {} failed",
        r.objects, r.messages, r.accepted, r.duplicates, r.late, r.quarantined, r.failed
    ))
}

pub fn twin(t: &Twin, json: bool) -> Result<()> {
    if json {
        return print_json(&json!({
            "thing": t.thing, "shadow": t.shadow, "version": t.version, "deleted": t.deleted,
            "desired": t.desired, "reported": t.reported, "delta": t.delta,
            "drift_keys": t.drift_keys(), "drift_since_ms": t.drift_since_ms, "updated_ms": t.updated_ms,
            "diverged": t.diverged,
        }));
    }
    let shown = |m: &serde_json::Map<String, serde_json::Value>| serde_json::to_string(m).unwrap_or_default();
    table(
        &["FIELD", "VALUE"],
        &[
            vec!["thing".into(), t.thing.to_string()],
            vec!["shadow".into(), t.shadow.to_string()],
            vec!["version".into(), format!("{}{}", t.version, if t.deleted { " (deleted)" } else { "" })],
            vec!["desired".into(), shown(&t.desired)],
            vec!["reported".into(), shown(&t.reported)],
            vec!["delta".into(), shown(&t.delta)],
            vec!["drifting since".into(), opt(t.drift_since_ms.map(rfc3339_ms))],
            vec!["diverged".into(), diverged(t)],
            vec!["updated".into(), rfc3339_ms(t.updated_ms)],
        ],
    )
}

/// `mode (released; desired "eco", reported "on", since …)`, one per diverged key.
fn diverged(t: &Twin) -> String {
    let parts: Vec<String> = t
        .diverged
        .iter()
        .map(|(key, d)| {
            let state = if d.released { "released".to_owned() } else { d.action.as_str().to_owned() };
            let reported = d.reported.as_ref().map_or_else(|| "nothing".to_owned(), |v| v.to_string());
            format!(
                "{key} ({state}; desired {}, reported {reported}, since {})",
                d.desired,
                rfc3339_ms(d.since_ms)
            )
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

pub fn policies(policies: &[StalePolicy], json: bool) -> Result<()> {
    if json {
        return print_json(&policies);
    }
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            let after = humantime::format_duration(std::time::Duration::from_millis(
                p.diverge_after_ms.max(0) as u64,
            ));
            vec![p.key.clone(), after.to_string(), p.action.as_str().to_owned()]
        })
        .collect();
    table(&["KEY", "DIVERGED AFTER", "ACTION"], &rows)
}

pub fn drifting(twins: &[Twin], now_ms: i64, json: bool) -> Result<()> {
    if json {
        let rows: Vec<_> = twins
            .iter()
            .map(|t| {
                json!({"thing": t.thing, "shadow": t.shadow, "version": t.version,
                            "drift_keys": t.drift_keys(), "drift_since_ms": t.drift_since_ms,
                            "diverged": t.diverged.keys().collect::<Vec<_>>()})
            })
            .collect();
        return print_json(&rows);
    }
    let rows: Vec<Vec<String>> = twins
        .iter()
        .map(|t| {
            let age = t.drift_since_ms.map(|s| {
                humantime::format_duration(
                    std::time::Duration::from_secs(((now_ms - s) / 1000).max(0) as u64),
                )
            });
            let diverged: Vec<&str> = t.diverged.keys().map(String::as_str).collect();
            vec![
                t.thing.to_string(),
                t.shadow.to_string(),
                t.drift_keys().join(","),
                opt(t.drift_since_ms.map(rfc3339_ms)),
                opt(age),
                if diverged.is_empty() { "-".to_owned() } else { diverged.join(",") },
            ]
        })
        .collect();
    table(&["THING", "SHADOW", "DRIFTING KEYS", "SINCE", "FOR", "DIVERGED"], &rows)
}

pub fn write_outcome(thing: &ThingName, shadow: &ShadowName, o: &WriteOutcome, json: bool) -> Result<()> {
    let (outcome, version, attempts, code, message) = match o {
        WriteOutcome::Applied { version, attempts } => {
            ("applied", Some(*version), Some(*attempts), None, None)
        }
        WriteOutcome::GaveUp { attempts } => ("gave_up", None, Some(*attempts), None, None),
        WriteOutcome::Rejected { code, message } => {
            ("rejected", None, None, Some(*code), Some(message.as_str()))
        }
    };
    if json {
        return print_json(&json!({"thing": thing, "shadow": shadow, "outcome": outcome, "version": version,
                                  "attempts": attempts, "code": code, "message": message}));
    }
    let detail = match o {
        WriteOutcome::Applied { version, attempts } => format!("version {version} (attempt {attempts})"),
        WriteOutcome::GaveUp { attempts } => format!("after {attempts} version conflicts"),
        WriteOutcome::Rejected { code, message } => format!("{code}: {message}"),
    };
    table(
        &["THING", "SHADOW", "OUTCOME", "DETAIL"],
        &[vec![thing.to_string(), shadow.to_string(), outcome.into(), detail]],
    )
}

pub fn deleted(thing: &ThingName, shadow: &ShadowName, version: Option<u64>, json: bool) -> Result<()> {
    let outcome = if version.is_some() { "deleted" } else { "not_found" };
    if json {
        return print_json(
            &json!({"thing": thing, "shadow": shadow, "outcome": outcome, "version": version}),
        );
    }
    let detail = version.map(|v| format!("was at version {v}")).unwrap_or_else(|| "no such shadow".into());
    table(
        &["THING", "SHADOW", "OUTCOME", "DETAIL"],
        &[vec![thing.to_string(), shadow.to_string(), outcome.into(), detail]],
    )
}

pub fn twins(twins: &[Twin], json: bool) -> Result<()> {
    if json {
        let rows: Vec<_> = twins
            .iter()
            .map(|t| {
                json!({"thing": t.thing, "shadow": t.shadow, "version": t.version, "reported": t.reported,
                            "drift_keys": t.drift_keys()})
            })
            .collect();
        return print_json(&rows);
    }
    let rows: Vec<Vec<String>> = twins
        .iter()
        .map(|t| {
            vec![
                t.thing.to_string(),
                t.shadow.to_string(),
                t.version.to_string(),
                opt(t.reported_fw()),
                t.drift_keys().join(","),
            ]
        })
        .collect();
    table(&["THING", "SHADOW", "VERSION", "FW", "DRIFTING KEYS"], &rows)
}

pub fn allowlist(entries: &[AllowlistEntry], json: bool) -> Result<()> {
    if json {
        return print_json(&entries);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let (state, detail) = match &e.enrolment {
                Enrolment::Allowed => ("allowed", "-".to_owned()),
                Enrolment::Provisioned { certificate, at_ms, .. } => {
                    ("provisioned", format!("{certificate} at {}", rfc3339_ms(*at_ms)))
                }
                Enrolment::Decommissioned { at_ms } => ("decommissioned", rfc3339_ms(*at_ms)),
            };
            vec![e.serial.to_string(), e.class.clone(), e.region.clone(), state.into(), detail]
        })
        .collect();
    table(&["SERIAL", "CLASS", "REGION", "STATE", "DETAIL"], &rows)
}

pub fn certificates(certs: &[Certificate], now_ms: i64, json: bool) -> Result<()> {
    use fleet_shared::certs::expiry::{classify, Threshold};
    let class = |c: &Certificate| classify(c.not_after_ms, now_ms, Threshold::default()).map(|k| k.as_str());
    if json {
        let rows: Vec<_> = certs
            .iter()
            .map(|c| json!({"id": c.id, "thing": c.thing, "serial": c.serial, "issuer": c.issuer,
                            "subject": c.subject, "not_before_ms": c.not_before_ms, "not_after_ms": c.not_after_ms,
                            "status": c.status, "expiry": class(c)}))
            .collect();
        return print_json(&rows);
    }
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                opt(c.thing.as_ref().map(ToString::to_string)),
                rfc3339_ms(c.not_after_ms),
                c.status.as_str().into(),
                class(c).unwrap_or("ok").into(),
            ]
        })
        .collect();
    table(&["CERTIFICATE", "THING", "NOT AFTER", "STATUS", "EXPIRY"], &rows)
}

pub fn findings(claims: &[(String, u64)], trail: &[AuditEvent], json: bool) -> Result<()> {
    if json {
        let claims: Vec<_> = claims
            .iter()
            .map(|(claim, n)| json!({"claim_certificate": claim, "unknown_serials": n}))
            .collect();
        return print_json(&json!({"suspicious_claims": claims, "trail": trail}));
    }
    let rows: Vec<Vec<String>> = claims.iter().map(|(claim, n)| vec![claim.clone(), n.to_string()]).collect();
    table(&["CLAIM CERTIFICATE", "UNKNOWN SERIALS"], &rows)?;
    if !trail.is_empty() {
        let rows: Vec<Vec<String>> = trail
            .iter()
            .map(|e| {
                vec![
                    rfc3339_ms(e.at_ms),
                    e.outcome.clone(),
                    opt(e.reason.clone()),
                    opt(e.certificate.clone()),
                ]
            })
            .collect();
        table(&["AT", "OUTCOME", "REASON", "CERTIFICATE"], &rows)?;
    }
    Ok(())
}

pub fn decommissioned(d: &fleet_shared::certs::decommission::Decommissioned, json: bool) -> Result<()> {
    if json {
        return print_json(d);
    }
    let before = match &d.entry_before {
        Some(e) => format!("{:?}", e.enrolment).to_lowercase(),
        None => "not on the allowlist".to_owned(),
    };
    println!("{} decommissioned (allowlist before: {})", printable(d.thing.as_str()), printable(&before));
    deactivations(&d.deactivated, &d.already_inactive)
}

pub fn retired(r: &fleet_shared::certs::decommission::Retired, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    println!("{}: kept {} (its serial's current certificate)", printable(r.thing.as_str()), r.kept);
    deactivations(&r.deactivated, &r.already_inactive)
}

/// Certificates deactivated now, then those already inactive or revoked.
fn deactivations(now: &[CertificateId], before: &[CertificateId]) -> Result<()> {
    let rows: Vec<Vec<String>> = now
        .iter()
        .map(|id| vec![id.to_string(), "deactivated now".to_owned()])
        .chain(before.iter().map(|id| vec![id.to_string(), "already inactive or revoked".to_owned()]))
        .collect();
    table(&["CERTIFICATE", "STATUS"], &rows)
}

pub fn reconciliation(r: &fleet_shared::certs::reconcile::Reconciliation, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "listed {}, described {}, adopted {}, updated {}, retried {}, unreadable {}",
        r.listed,
        r.described,
        r.adopted,
        r.updated,
        r.retried,
        r.unreadable.len()
    );
    let rows: Vec<Vec<String>> = r
        .findings
        .iter()
        .map(|f| {
            use fleet_shared::certs::reconcile::Finding;
            let names =
                |things: &[ThingName]| things.iter().map(ThingName::as_str).collect::<Vec<_>>().join(",");
            let (certificate, things, detail) = match f {
                Finding::InactiveAttached { certificate, status, things } => {
                    (certificate, names(things), status.as_str().to_owned())
                }
                Finding::SharedCertificate { certificate, things } => {
                    (certificate, names(things), format!("{} things", things.len()))
                }
                Finding::OnlyCertificateExpired { thing, certificate, not_after_ms } => {
                    (certificate, thing.to_string(), format!("expired {}", rfc3339_ms(*not_after_ms)))
                }
            };
            vec![f.kind().to_owned(), certificate.to_string(), things, detail]
        })
        .collect();
    table(&["FINDING", "CERTIFICATE", "THINGS", "DETAIL"], &rows)
}

pub fn presence(thing: &ThingName, p: &fleet_shared::health::presence::Presence, json: bool) -> Result<()> {
    if json {
        return print_json(&json!({"thing": thing, "presence": p}));
    }
    let since = p.session_started_ms.map(rfc3339_ms).unwrap_or_else(|| "-".to_owned());
    let length = p.session_ms.map(|ms| format!("{} s", ms / 1000)).unwrap_or_else(|| "-".to_owned());
    let row = vec![
        thing.to_string(),
        if p.connected { "connected" } else { "disconnected" }.to_owned(),
        rfc3339_ms(p.place.at_ms),
        since,
        length,
        opt(p.disconnect_reason.clone()),
        p.place.version.to_string(),
        opt(p.principal.clone()),
    ];
    table(
        &[
            "THING",
            "STATE",
            "AT",
            "SESSION START",
            "SESSION LENGTH",
            "DISCONNECT REASON",
            "VERSION",
            "PRINCIPAL",
        ],
        &[row],
    )
}

/// What `fleetctl command send` sent.
pub fn command_sent(sent: &command_dispatch::handler::Sent, json: bool) -> Result<()> {
    if json {
        return print_json(sent);
    }
    table(
        &["CMD_ID", "SEQ", "EXPIRES", "TOPIC"],
        &[vec![
            sent.cmd_id.clone(),
            sent.seq.to_string(),
            rfc3339_ms(sent.expires_at),
            printable(&sent.topic).into_owned(),
        ]],
    )
}

/// Commands with the status a reader sees (`expired` for one never answered in time).
pub fn commands(commands: &[fleet_shared::commands::CommandRecord], now_ms: i64, json: bool) -> Result<()> {
    if json {
        let shown: Vec<serde_json::Value> = commands
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                v["status"] = json!(c.shown_status(now_ms));
                v
            })
            .collect();
        return print_json(&shown);
    }
    let rows: Vec<Vec<String>> = commands
        .iter()
        .map(|c| {
            vec![
                printable(&c.cmd_id).into_owned(),
                printable(&c.thing).into_owned(),
                c.seq.to_string(),
                printable(&c.name).into_owned(),
                c.shown_status(now_ms).to_owned(),
                opt(c.latency_ms.map(|l| format!("{l} ms"))),
                printable(c.reason.as_deref().unwrap_or("")).into_owned(),
                rfc3339_ms(c.issued_at),
            ]
        })
        .collect();
    table(&["CMD_ID", "THING", "SEQ", "NAME", "STATUS", "LATENCY", "REASON", "ISSUED"], &rows)
}

/// What `fleetctl devices count-connected` did.
pub fn backfilled(b: &fleet_shared::health::backfill::Backfilled, json: bool) -> Result<()> {
    if json {
        return print_json(b);
    }
    emit(&format!(
        "{} presences read; {} connected devices counted now, {} changed meanwhile (their events count them)",
        b.devices, b.counted, b.changed_meanwhile
    ))
}

/// The gate's answer, then one line per SLO with both cohorts' readings.
pub fn ota_gate(
    verdict: &fleet_shared::ota::gate::Verdict,
    comparisons: &[fleet_shared::ota::gate::Comparison],
    minute: i64,
    json: bool,
) -> Result<()> {
    use fleet_shared::ota::gate::Verdict;
    if json {
        return print_json(&serde_json::json!({
            "minute": minute,
            "verdict": verdict,
            "slos": comparisons,
        }));
    }
    let burn = |b: Option<f64>| b.map_or_else(|| "-".to_owned(), |b| format!("{b:.2}x"));
    let rows: Vec<Vec<String>> = comparisons
        .iter()
        .map(|c| {
            let said = match &c.verdict {
                Verdict::Advance => "advance".to_owned(),
                Verdict::Wait(_) => "wait".to_owned(),
                Verdict::RollBack(_) => "roll back".to_owned(),
            };
            vec![
                c.canary.slo.clone(),
                format!("{}/{}", c.canary.good, c.canary.total),
                burn(c.canary.burn_rate),
                format!("{}/{}", c.control.good, c.control.total),
                burn(c.control.burn_rate),
                said,
            ]
        })
        .collect();
    table(
        &["SLO", "CANARY_GOOD/TOTAL", "CANARY_BURN", "CONTROL_GOOD/TOTAL", "CONTROL_BURN", "VERDICT"],
        &rows,
    )?;
    let window = comparisons.first().map_or(0, |c| c.canary.window_minutes);
    match verdict {
        Verdict::Advance => emit(&format!(
            "advance: every SLO passes over the {window} min through the minute {}",
            rfc3339_ms(minute * 60_000)
        )),
        Verdict::Wait(why) => emit(&format!("wait: {why}")),
        Verdict::RollBack(why) => emit(&format!("roll back: {why}")),
    }
}

/// A campaign's stage as a short text: `2/4 (10%)`.
pub fn campaigns(list: &[fleet_shared::ota::campaign::Campaign], json: bool) -> Result<()> {
    if json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.spec.id.clone(),
                c.change_text(),
                c.state_text(),
                c.stage_text(),
                format!("{}/{}", c.targeted, c.population),
                rfc3339_ms(c.updated_ms),
            ]
        })
        .collect();
    table(&["CAMPAIGN", "CHANGE", "STATE", "STAGE", "TARGETED/ELIGIBLE", "UPDATED"], &rows)
}

pub fn campaign(c: &fleet_shared::ota::campaign::Campaign, json: bool) -> Result<()> {
    use fleet_shared::ota::campaign::State;
    if json {
        return print_json(c);
    }
    campaigns(std::slice::from_ref(c), false)?;
    if let Some(why) = &c.paused {
        emit(&format!("paused: {}", printable(why)))?;
    }
    match &c.state {
        State::Stage(s) => {
            emit(&format!("job {}: {}", s.job, printable(s.last.as_deref().unwrap_or("just started"))))?
        }
        State::RollingBack { reason, job, .. } => {
            emit(&format!("rolling back with job {job}: {}", printable(reason)))?
        }
        State::Pending
        | State::RolledBack { .. }
        | State::Halted { .. }
        | State::Completed
        | State::Aborted { .. } => {}
    }
    if let Some(reason) = c.end_reason() {
        emit(&format!("why: {}", printable(reason)))?;
    }
    for entry in &c.log {
        emit(&format!("  {}  {}", rfc3339_ms(entry.at_ms), printable(&entry.text)))?;
    }
    Ok(())
}

/// What `fleetctl ota tick` did: campaign, state after, summary.
pub fn campaign_ticks(lines: &[(String, &str, String)], json: bool) -> Result<()> {
    if json {
        let out: Vec<_> = lines
            .iter()
            .map(|(id, state, summary)| json!({"campaign": id, "state": state, "summary": summary}))
            .collect();
        return print_json(&out);
    }
    if lines.is_empty() {
        return emit("no active campaign");
    }
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|(id, state, summary)| vec![id.clone(), (*state).to_owned(), summary.clone()])
        .collect();
    table(&["CAMPAIGN", "STATE", "NOW"], &rows)
}
