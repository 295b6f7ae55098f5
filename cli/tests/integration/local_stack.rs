//! End-to-end tests of `fleetctl local`: the real binary on free loopback ports, real MQTT
//! clients (`mosquitto_pub`), the HTTP API, and the dashboard in headless Chromium.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::support::{spawn_local, FLEETCTL};

#[test]
#[ignore = "needs mosquitto_pub (mosquitto-clients), installed by scripts/test.sh"]
fn shadow_documents_become_twins_that_fleetctl_shows_and_lists_as_drifting() -> Result<()> {
    // GIVEN fleetctl local, and the documents of a shadow update whose desired fw is not reported
    let mut local = Local::start()?;
    let documents = r#"{"previous":null,"timestamp":1764000000,"current":{"state":{"desired":{"fw":"1.5.0"},"reported":{"fw":"1.4.2","bat":80}},"metadata":{},"version":3}}"#;
    local.publish_as_operator("$aws/things/sensor-001/shadow/update/documents", documents)?;
    // WHEN twin-sync has mirrored it
    let deadline = Instant::now() + Duration::from_secs(20);
    let twin = loop {
        let out = Command::new(FLEETCTL)
            .arg("--db")
            .arg(&local.db)
            .args(["twin", "show", "sensor-001", "--json"])
            .output()?;
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout)?;
        }
        ensure!(
            Instant::now() < deadline,
            "no twin: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            local.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // THEN fleetctl shows the twin with its delta, and lists it among drifting twins
    assert_eq!(
        (twin["version"].as_u64(), &twin["delta"]),
        (Some(3), &serde_json::json!({"fw":"1.5.0"})),
        "{twin}"
    );
    assert_eq!(twin["drift_since_ms"].as_i64(), Some(1_764_000_000_000));
    let drifting = local.fleetctl_json(&["twin", "drift", "--older-than", "1h"])?;
    assert_eq!(drifting[0]["thing"], "sensor-001", "{drifting}");
    assert_eq!(drifting[0]["drift_keys"], serde_json::json!(["fw"]));
    let status = local.stop_with("INT")?;
    assert!(status.success(), "exit {status}: {}", local.log());
    Ok(())
}

/// A running `fleetctl local`, interrupted (Ctrl-C) and reaped on drop.
struct Local {
    child: Option<Child>,
    mqtt: u16,
    http: SocketAddr,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Local {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("fleet.sqlite");
        let status = Command::new(FLEETCTL)
            .arg("--db")
            .arg(&db)
            .args([
                "devices",
                "register",
                "sensor-001",
                "--class",
                "env-sensor",
                "--region",
                "eu-west",
                "--fw",
                "1.4.2",
            ])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "registering a device failed");
        let (child, mqtt, http) = spawn_local(&db, &dir.path().join("local.log"))?;
        Ok(Local { child: Some(child), mqtt: mqtt.port(), http, db, _dir: dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.db.with_file_name("local.log")).unwrap_or_default()
    }

    fn publish(&self, thing: &str, payload: &str) -> Result<()> {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt.to_string(), "-q", "1", "-i", thing])
            .args(["-t", &format!("dt/fleet/{thing}/telemetry"), "-m", payload])
            .output()
            .context("running mosquitto_pub (scripts/test.sh installs mosquitto-clients)")?;
        ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Publish as the operator (an IAM principal, not bound by the device policy), e.g. the
    /// documents AWS's shadow service publishes.
    fn publish_as_operator(&self, topic: &str, payload: &str) -> Result<()> {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt.to_string(), "-q", "1", "-i", "ops", "-u", "operator"])
            .args(["-t", topic, "-m", payload])
            .output()
            .context("running mosquitto_pub (scripts/test.sh installs mosquitto-clients)")?;
        ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// `fleetctl --db <this stack's db> <args> --json`, parsed.
    fn fleetctl_json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(FLEETCTL).arg("--db").arg(&self.db).args(args).arg("--json").output()?;
        ensure!(out.status.success(), "fleetctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Wait until the pipeline has settled `n` messages; returns the health document.
    fn settled(&self, n: u64) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h: Value = serde_json::from_str(&get(self.http, "/api/health")?)?;
            let p = &h["pipeline"];
            let done = ["Accepted", "Duplicates", "Quarantined"]
                .iter()
                .map(|k| p["metrics"][k].as_u64().unwrap_or(0))
                .sum::<u64>();
            if done >= n {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("only {done} of {n} messages settled: {h}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Send `signal` (`INT` for Ctrl-C, `TERM`), then the exit status.
    fn stop_with(&mut self, signal: &str) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("fleetctl local did not stop after SIG{signal}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.1 GET on loopback; the body of a 200, an error otherwise.
fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_owned())
}

fn valid(seq: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    format!(
        r#"{{"v":1,"seq":{seq},"boot":1,"ts":{now},"fw":"1.4.2","m":{{"temp_c":21.5,"hum_pct":40.0}},"bat":88}}"#
    )
}

#[test]
#[ignore = "needs mosquitto_pub (mosquitto-clients), installed by scripts/test.sh"]
fn mosquitto_pub_valid_duplicate_and_malformed_store_one_reading_and_quarantine_the_rest() -> Result<()> {
    // GIVEN fleetctl local on free ports with sensor-001 registered
    let mut local = Local::start()?;
    // WHEN a valid message, the same message again, a malformed one and one with a repeated
    // key are published over MQTT
    let payload = valid(1);
    local.publish("sensor-001", &payload)?;
    local.publish("sensor-001", &payload)?;
    local.publish("sensor-001", r#"{"v":1,"seq":"#)?;
    let repeated = valid(2).replacen(r#""v":1,"#, r#""v":1,"v":2,"#, 1);
    local.publish("sensor-001", &repeated)?;
    // THEN exactly one reading is stored, one duplicate absorbed, two quarantined with their reasons
    let health = local.settled(4)?;
    assert_eq!(health["pipeline"]["metrics"]["Accepted"], 1, "{health}");
    assert_eq!(health["pipeline"]["metrics"]["Duplicates"], 1, "{health}");
    let readings: Value = serde_json::from_str(&get(local.http, "/api/devices/sensor-001/telemetry")?)?;
    assert_eq!(readings["items"].as_array().map(Vec::len), Some(1), "{readings}");
    assert_eq!(readings["items"][0]["class"], "env-sensor");
    let quarantine: Value = serde_json::from_str(&get(local.http, "/api/quarantine")?)?;
    let items = quarantine["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{quarantine}");
    let line = |reason: &str| items.iter().find(|l| l["reasons"][0]["reason"] == reason).cloned();
    let malformed = line("malformed_json").context("no malformed_json line")?;
    assert_eq!(malformed["body"], r#"{"v":1,"seq":"#);
    // The repeated key reached the function as sent (the rules engine does not pick one), with
    // the rule's fields after it, and is quarantined with its path, the thing and the topic.
    let dup = line("duplicate_key").context("no duplicate_key line")?;
    assert_eq!(dup["reasons"][0]["field"].as_str(), Some("v"));
    let body = dup["body"].as_str().unwrap_or_default();
    assert!(body.starts_with(&repeated[..repeated.len() - 1]), "the device's text is kept: {body}");
    assert_eq!(dup["topic"], "dt/fleet/sensor-001/telemetry", "{dup}");
    let by_reason: Value = serde_json::from_str(&get(local.http, "/api/quarantine?reason=malformed_json")?)?;
    assert_eq!(by_reason["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(health["quarantined_by_reason"]["malformed_json"], 1);
    // AND the list pages: one item and a cursor, then the other and no cursor
    let first: Value = serde_json::from_str(&get(local.http, "/api/quarantine?limit=1")?)?;
    let cursor = first["next"].as_str().context("no next cursor")?.to_owned();
    let second: Value =
        serde_json::from_str(&get(local.http, &format!("/api/quarantine?limit=1&cursor={cursor}"))?)?;
    assert_eq!(second["items"].as_array().map(Vec::len), Some(1), "{second}");
    assert!(second.get("next").is_none(), "{second}");
    assert_ne!(first["items"][0], second["items"][0]);
    // AND Ctrl-C stops the stack cleanly
    let status = local.stop_with("INT")?;
    assert!(status.success(), "exit {status}: {}", local.log());
    Ok(())
}

/// 500 QoS 1 messages in one burst, then `signal` at once: every acknowledged one is stored.
fn stop_right_after_publishing_loses_nothing_acknowledged(signal: &str) -> Result<()> {
    // GIVEN 500 messages published at QoS 1 in one burst (mosquitto_pub exits once all are acked)
    let mut local = Local::start()?;
    let lines: String = (1..=500).map(|seq| valid(seq) + "\n").collect();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &local.mqtt.to_string(), "-q", "1", "-i", "sensor-001", "-l"])
        .args(["-t", "dt/fleet/sensor-001/telemetry"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running mosquitto_pub")?;
    publisher.stdin.take().context("stdin")?.write_all(lines.as_bytes())?;
    ensure!(publisher.wait()?.success(), "mosquitto_pub failed");
    // WHEN the stack is signalled at once
    let status = local.stop_with(signal)?;
    ensure!(status.success(), "exit {status}: {}", local.log());
    ensure!(local.log().contains(&format!("SIG{signal}: stopping")), "{}", local.log());
    // THEN every acknowledged message was stored before it exited
    let out = Command::new(FLEETCTL)
        .arg("--db")
        .arg(&local.db)
        .args(["--json", "telemetry", "sensor-001", "--limit", "1000"])
        .output()?;
    let readings: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(readings.as_array().map(Vec::len), Some(500), "{}", local.log());
    Ok(())
}

#[test]
#[ignore = "needs mosquitto_pub (mosquitto-clients), installed by scripts/test.sh"]
fn ctrl_c_right_after_publishing_loses_nothing_acknowledged() -> Result<()> {
    stop_right_after_publishing_loses_nothing_acknowledged("INT")
}

#[test]
#[ignore = "needs mosquitto_pub (mosquitto-clients), installed by scripts/test.sh"]
fn sigterm_right_after_publishing_loses_nothing_acknowledged() -> Result<()> {
    stop_right_after_publishing_loses_nothing_acknowledged("TERM")
}

/// A device keeps publishing at QoS 1 (up to 5,000 messages/s, more than a debug build handles) while the stack is signalled: the
/// stack exits within its drain deadline although the device never stops, and every message
/// the broker acknowledged is stored.
fn stop_under_continuous_publishing_loses_nothing_acknowledged(signal: &str) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;

    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    // GIVEN a device publishing without pause (sequence numbers 1, 2, 3, ... in order on one
    // connection, so the acknowledged ones are exactly the first `acked`)
    let mut local = Local::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let acked = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&acked);
    let port = local.mqtt;
    let device = runtime.spawn(async move {
        let mut opts = MqttOptions::new("sensor-001", "127.0.0.1", port);
        opts.set_inflight(100);
        let (client, mut events) = AsyncClient::new(opts, 100);
        let publishing = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for seq in 1.. {
                if seq % 50 == 1 {
                    tick.tick().await;
                }
                let topic = "dt/fleet/sensor-001/telemetry";
                if client.publish(topic, QoS::AtLeastOnce, false, valid(seq)).await.is_err() {
                    return;
                }
            }
        });
        // Count acknowledgements until the stack goes away.
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counter.fetch_add(1, SeqCst);
            }
        }
        publishing.abort();
    });
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(acked.load(SeqCst) > 0, "nothing acknowledged: {}", local.log());
    // WHEN the stack is signalled mid-stream
    let signalled = Instant::now();
    let status = local.stop_with(signal)?;
    let stopped_in = signalled.elapsed();
    ensure!(status.success(), "exit {status}: {}", local.log());
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), device).await });
    let acked = acked.load(SeqCst);
    // THEN it stopped within the drain deadline while the device kept publishing
    assert!(stopped_in < Duration::from_secs(10), "took {stopped_in:?} to stop");
    // AND every acknowledged message is stored
    let out = Command::new(FLEETCTL)
        .arg("--db")
        .arg(&local.db)
        .args(["--json", "telemetry", "sensor-001", "--limit", "1000000"])
        .output()?;
    let readings: Value = serde_json::from_slice(&out.stdout)?;
    let stored: std::collections::BTreeSet<u64> =
        readings.as_array().context("readings")?.iter().filter_map(|r| r["id"]["seq"].as_u64()).collect();
    let missing: Vec<u64> = (1..=acked).filter(|seq| !stored.contains(seq)).collect();
    eprintln!(
        "SIG{signal} mid-stream: {acked} acknowledged, {} stored, stopped in {stopped_in:?}",
        stored.len()
    );
    assert!(
        missing.is_empty(),
        "{} of {acked} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    Ok(())
}

#[test]
fn sigint_under_continuous_publishing_loses_nothing_acknowledged() -> Result<()> {
    stop_under_continuous_publishing_loses_nothing_acknowledged("INT")
}

#[test]
fn sigterm_under_continuous_publishing_loses_nothing_acknowledged() -> Result<()> {
    stop_under_continuous_publishing_loses_nothing_acknowledged("TERM")
}

/// The DOM of a dashboard page as headless Chromium rendered it.
fn chromium_dom(http: SocketAddr, profile: &Path, path: &str) -> Result<String> {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("http://{http}{path}"))
        .output()
        .context("running chromium (scripts/test.sh installs it)")?;
    ensure!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
#[ignore = "needs mosquitto_pub and Debian's chromium, installed by scripts/test.sh"]
fn dashboard_shows_the_fleet_figures_in_headless_chromium() -> Result<()> {
    let local = Local::start()?;
    local.publish("sensor-001", &valid(7))?;
    local.publish("stray-42", &valid(1))?;
    local.publish("sensor-001", "not json at all")?;
    local.settled(3)?;
    let profile = tempfile::tempdir()?;
    let dump = |path: &str| chromium_dom(local.http, profile.path(), path);
    // The fleet overview, as Chromium rendered it.
    let dom = dump("/")?;
    for figure in [
        r#"id="devices-total">2<"#,
        r#"id="devices-online">2<"#,
        r#"id="telemetry-freshness">100%<"#,
        r#"id="stored">2<"#,
        r#"id="quarantined-total">1<"#,
        r#"id="reason-malformed_json">1<"#,
        r#"href="/devices/sensor-001""#,
        r#"<td class="online">online</td>"#,
        r#"id="twins-drifting">0<"#,
    ] {
        assert!(dom.contains(figure), "dashboard lacks {figure}:\n{dom}");
    }
    // A device page with its metrics charted as SVG.
    let device = dump("/devices/sensor-001")?;
    assert!(device.contains("<svg") && device.contains("temp_c"), "{device}");
    Ok(())
}

#[test]
#[ignore = "needs mosquitto_pub and Debian's chromium, installed by scripts/test.sh"]
fn dashboard_lists_a_drifting_twin_with_its_keys_and_shows_its_shadow_in_headless_chromium() -> Result<()> {
    // GIVEN fleetctl local, and sensor-001 reporting firmware 1.4.2 on its classic shadow
    let local = Local::start()?;
    let update = "$aws/things/sensor-001/shadow/update";
    let report = r#"{"state":{"reported":{"fw":"1.4.2","mode":"normal"}}}"#;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &local.mqtt.to_string(), "-q", "1", "-i", "sensor-001"])
        .args(["-t", update, "-m", report])
        .output()
        .context("running mosquitto_pub (scripts/test.sh installs mosquitto-clients)")?;
    ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    // WHEN an operator desires firmware 1.5.0 and a label holding markup, neither of which the
    // device reports, through the local IoT Core's shadow service
    local.publish_as_operator(update, r#"{"state":{"desired":{"fw":"1.5.0","label":"<b>lab</b>"}}}"#)?;
    // (generous: the whole suite runs at once on two cores)
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(local.http, "/twins/sensor-001").is_ok_and(|page| page.contains(r#"id="twin-version">2<"#)) {
        ensure!(Instant::now() < deadline, "twin of sensor-001 not at version 2:\n{}", local.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // THEN the twins page, as Chromium rendered it, lists sensor-001 with each drifting key,
    // desired against reported, the label as text
    let profile = tempfile::tempdir()?;
    let dump = |path: &str| chromium_dom(local.http, profile.path(), path);
    let twins = dump("/twins")?;
    for part in [
        r#"id="twins-drifting">1<"#,
        r#"<a href="/twins/sensor-001">sensor-001</a>"#,
        r#"<td class="key"><code>fw</code></td><td class="desired"><code>"1.5.0"</code></td><td class="reported"><code>"1.4.2"</code></td>"#,
        r#"<td class="key"><code>label</code></td><td class="desired"><code>"&lt;b&gt;lab&lt;/b&gt;"</code></td><td class="reported"><span class="muted">not reported</span></td>"#,
        r#"<span class="muted">classic</span>"#,
    ] {
        assert!(twins.contains(part), "twins page lacks {part}:\n{twins}");
    }
    assert!(!twins.contains("<b>") && !twins.contains(">mode<"), "{twins}");
    // AND the twin's page shows its version, state and documents
    let twin = dump("/twins/sensor-001")?;
    for part in [
        r#"id="twin-version">2<"#,
        r#"id="twin-state">drifting<"#,
        r#"id="drift-keys">2<"#,
        r#""fw": "1.5.0""#,
        r#""mode": "normal""#,
    ] {
        assert!(twin.contains(part), "twin page lacks {part}:\n{twin}");
    }
    // AND the fleet overview counts it and links to the list
    let fleet = dump("/")?;
    assert!(fleet.contains(r#"id="twins-drifting">1<"#) && fleet.contains(r#"href="/twins""#), "{fleet}");
    Ok(())
}

#[test]
#[ignore = "needs mosquitto_pub and mosquitto_sub (mosquitto-clients), installed by scripts/test.sh"]
fn fleetctl_sends_a_signed_command_that_a_device_acks_and_shows_its_status_and_list() -> Result<()> {
    let local = Local::start()?;
    // GIVEN sensor-001 listening on its request topic (mosquitto_sub as the device)
    let device = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &local.mqtt.to_string(), "-q", "1", "-i", "sensor-001"])
        .args(["-t", "cmd/fleet/sensor-001/req", "-C", "1", "-W", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running mosquitto_sub (scripts/test.sh installs mosquitto-clients)")?;
    std::thread::sleep(Duration::from_millis(500));
    // WHEN the operator sends it a command
    let mqtt = format!("127.0.0.1:{}", local.mqtt);
    let sent = local.fleetctl_json(&[
        "command",
        "send",
        "sensor-001",
        "reboot",
        r#"{"delay_s":5}"#,
        "--ttl",
        "2m",
        "--mqtt",
        &mqtt,
    ])?;
    let cmd_id = sent["cmd_id"].as_str().context("cmd_id")?.to_owned();
    // THEN the device gets the signed envelope
    let out = device.wait_with_output()?;
    let envelope: Value = serde_json::from_slice(&out.stdout).context("the device got one command")?;
    ensure!(envelope["cmd_id"] == cmd_id.as_str() && envelope["seq"] == 1, "{envelope}");
    ensure!(
        envelope["sig"].as_str().is_some_and(|s| s.len() == 88) && envelope["kid"] == "local",
        "{envelope}"
    );
    ensure!(
        envelope["expires_at"].as_i64() == envelope["issued_at"].as_i64().map(|t| t + 120_000),
        "{envelope}"
    );
    // WHEN the device acknowledges it
    let ack = format!(r#"{{"cmd_id":"{cmd_id}","status":"succeeded","result":{{"rebooting":true}}}}"#);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &local.mqtt.to_string(), "-q", "1", "-i", "sensor-001"])
        .args(["-t", "cmd/fleet/sensor-001/res", "-m", &ack])
        .output()?;
    ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    // THEN `command status` and `command list` show it succeeded, with its latency
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = local.fleetctl_json(&["command", "status", &cmd_id])?;
        if s[0]["status"] != "sent" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(status[0]["status"] == "succeeded", "{status}\n{}", local.log());
    ensure!(
        status[0]["latency_ms"].as_i64().is_some() && status[0]["result"]["rebooting"] == true,
        "{status}"
    );
    let list = local.fleetctl_json(&["command", "list", "sensor-001"])?;
    ensure!(list.as_array().is_some_and(|l| l.len() == 1) && list[0]["cmd_id"] == cmd_id.as_str(), "{list}");
    Ok(())
}

#[test]
fn refuses_to_start_on_a_rule_it_cannot_evaluate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("template.yaml");
    std::fs::write(
        &template,
        "Resources:\n  BadRule:\n    Type: AWS::IoT::TopicRule\n    Properties:\n      TopicRulePayload:\n        AwsIotSqlVersion: '2016-03-23'\n        Sql: \"SELECT encode(*, 'base64') AS data FROM 'dt/#'\"\n        Actions: []\n",
    )?;
    let out = Command::new(FLEETCTL)
        .arg("--db")
        .arg(dir.path().join("x.sqlite"))
        .args(["local", "--http-port", "0", "--mqtt-port", "0"])
        .arg("--template")
        .arg(&template)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("topic rule BadRule") && stderr.contains("function encode()"), "{stderr}");
    Ok(())
}
