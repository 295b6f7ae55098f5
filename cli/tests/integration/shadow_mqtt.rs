//! The local IoT Core's Device Shadow MQTT API driven by Debian's `mosquitto_pub` and
//! `mosquitto_sub` against the real `fleetctl local` on free loopback ports: a device publishes
//! its requests on `$aws/things/<t>/shadow[/name/<s>]/update|get|delete` under its own client
//! id (the device policy's thing name), and an operator (`-u operator`, not bound by the device
//! policy) records every answer the shadow service publishes, in order.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::spawn_local;

#[test]
#[ignore = "needs mosquitto clients and fleetctl local, run by scripts/test.sh"]
fn device_update_conflict_delete_and_get_are_answered_on_the_shadow_topics() -> Result<()> {
    // GIVEN fleetctl local, and an operator recording the answers on sensor-042's classic shadow
    let local = Local::start()?;
    let thing = "sensor-042";
    let base = format!("$aws/things/{thing}/shadow");
    let answers = local.subscribe(&[&format!("{base}/+/+")], 7)?;

    // WHEN the device reports firmware 1.4.2 while desiring 2.1.0 (mode in sync, bat reported only)
    local.device_publish(
        thing,
        &format!("{base}/update"),
        &json!({"state": {"desired": {"fw": "2.1.0", "mode": "eco"},
                          "reported": {"fw": "1.4.2", "mode": "eco", "bat": 80}},
                "clientToken": "t1"}),
    )?;
    // AND sends an update carrying a version that is no longer the shadow's
    local.device_publish(
        thing,
        &format!("{base}/update"),
        &json!({"state": {"reported": {"fw": "2.1.0"}}, "version": 0, "clientToken": "t2"}),
    )?;
    // AND reads the shadow, deletes it, and reads it again
    local.device_publish(thing, &format!("{base}/get"), &json!({"clientToken": "t3"}))?;
    local.device_publish(thing, &format!("{base}/delete"), &json!({"clientToken": "t4"}))?;
    local.device_publish(thing, &format!("{base}/get"), &json!({"clientToken": "t5"}))?;
    let got = answers.finish(&local)?;

    // THEN the answers came in order on the expected topics
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    let expected: Vec<String> = [
        "update/accepted",
        "update/delta",
        "update/documents",
        "update/rejected",
        "get/accepted",
        "delete/accepted",
        "get/rejected",
    ]
    .iter()
    .map(|tail| format!("{base}/{tail}"))
    .collect();
    assert_eq!(topics, expected, "{got:#?}\n{}", local.log());
    let body = |i: usize| &got[i].1;
    // the update is accepted at version 1 with the request's state and token
    assert_eq!(body(0)["version"], 1, "{}", body(0));
    assert_eq!(body(0)["clientToken"], "t1");
    assert_eq!(body(0)["state"]["reported"], json!({"fw": "1.4.2", "mode": "eco", "bat": 80}));
    assert!(body(0)["metadata"]["desired"]["fw"]["timestamp"].is_i64(), "{}", body(0));
    // the delta holds only the desired key whose reported value differs
    assert_eq!((&body(1)["state"], &body(1)["version"]), (&json!({"fw": "2.1.0"}), &json!(1)), "{}", body(1));
    // the documents have no previous and the whole current document
    assert_eq!(body(2)["previous"], Value::Null, "{}", body(2));
    assert_eq!(body(2)["current"]["version"], 1);
    assert_eq!(body(2)["current"]["state"]["desired"], json!({"fw": "2.1.0", "mode": "eco"}));
    // the stale version is refused with 409 and changes nothing
    assert_eq!((&body(3)["code"], &body(3)["clientToken"]), (&json!(409), &json!("t2")), "{}", body(3));
    assert_eq!(body(4)["version"], 1, "the refused update changed the shadow: {}", body(4));
    assert_eq!(body(4)["state"]["reported"]["fw"], "1.4.2");
    assert_eq!(body(4)["state"]["delta"], json!({"fw": "2.1.0"}));
    // the delete names the version deleted; afterwards there is no shadow to get
    assert_eq!((&body(5)["version"], &body(5)["clientToken"]), (&json!(1), &json!("t4")), "{}", body(5));
    assert_eq!((&body(6)["code"], &body(6)["clientToken"]), (&json!(404), &json!("t5")), "{}", body(6));
    Ok(())
}

#[test]
#[ignore = "needs mosquitto clients and fleetctl local, run by scripts/test.sh"]
fn a_named_shadow_is_answered_on_its_own_topics_and_devices_cannot_forge_answers() -> Result<()> {
    // GIVEN fleetctl local, and an operator recording sensor-043's "config" and classic shadow answers
    let local = Local::start()?;
    let thing = "sensor-043";
    let classic = format!("$aws/things/{thing}/shadow");
    let named = format!("{classic}/name/config");
    let answers = local.subscribe(&[&format!("{named}/+/+"), &format!("{classic}/+/+")], 6)?;

    // WHEN the device reports its config (nothing desired yet), then an update desires a change
    local.device_publish(
        thing,
        &format!("{named}/update"),
        &json!({"state": {"reported": {"interval_s": 60}}}),
    )?;
    // AND the device tries to publish an answer itself (only the service may)
    local.device_publish(
        thing,
        &format!("{named}/update/accepted"),
        &json!({"state": {"reported": {"interval_s": 1}}, "version": 99}),
    )?;
    local.device_publish(
        thing,
        &format!("{named}/update"),
        &json!({"state": {"desired": {"interval_s": 30}}}),
    )?;
    // AND the classic shadow, never written, is read
    local.device_publish(thing, &format!("{classic}/get"), &json!({}))?;
    let got = answers.finish(&local)?;

    // THEN the named shadow answered under its own prefix, a delta only once desired differs
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    let expected = [
        format!("{named}/update/accepted"),
        format!("{named}/update/documents"),
        format!("{named}/update/accepted"),
        format!("{named}/update/delta"),
        format!("{named}/update/documents"),
        format!("{classic}/get/rejected"),
    ];
    assert_eq!(topics, expected, "{got:#?}\n{}", local.log());
    let body = |i: usize| &got[i].1;
    // AND the forged answer was never delivered: the versions are the service's own
    assert_eq!((&body(0)["version"], &body(2)["version"]), (&json!(1), &json!(2)), "{got:#?}");
    assert_eq!(body(3)["state"], json!({"interval_s": 30}), "{}", body(3));
    assert_eq!(body(4)["previous"]["state"], json!({"reported": {"interval_s": 60}}), "{}", body(4));
    assert_eq!(body(4)["current"]["state"]["desired"], json!({"interval_s": 30}));
    // AND the classic shadow is a different shadow: it does not exist
    assert_eq!(body(5)["code"], 404, "{}", body(5));
    Ok(())
}

/// A running `fleetctl local`, killed on drop.
struct Local {
    child: Option<Child>,
    mqtt: u16,
    dir: tempfile::TempDir,
}

impl Local {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (child, mqtt, _http) =
            spawn_local(&dir.path().join("fleet.sqlite"), &dir.path().join("local.log"))?;
        Ok(Local { child: Some(child), mqtt: mqtt.port(), dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("local.log")).unwrap_or_default()
    }

    /// Publish at QoS 1 as the device `thing` (client id = thing name, so the device policy
    /// applies). mosquitto_pub returns once the broker has acknowledged, and the shadow service
    /// publishes its answers before the acknowledgement, so requests are answered in order.
    fn device_publish(&self, thing: &str, topic: &str, payload: &Value) -> Result<()> {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt.to_string(), "-q", "1", "-i", thing])
            .args(["-t", topic, "-m", &payload.to_string()])
            .output()
            .context("running mosquitto_pub (scripts/test.sh installs mosquitto-clients)")?;
        ensure!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Start `mosquitto_sub` as the operator on `filters`, exiting after `count` messages (or
    /// 20 s); returns once the broker has acknowledged the subscription.
    fn subscribe(&self, filters: &[&str], count: usize) -> Result<Subscription> {
        // Line-buffered (stdbuf): a piped mosquitto_sub would otherwise hold its lines until exit.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &self.mqtt.to_string(), "-u", "operator"])
            .args(["-i", &format!("watch-{}", std::process::id()), "-d", "-v"])
            .args(["-C", &count.to_string(), "-W", "20"]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running stdbuf -oL mosquitto_sub (scripts/test.sh installs mosquitto-clients)")?;
        let stdout = child.stdout.take().context("mosquitto_sub stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sub = Subscription { child, lines, count, seen: Vec::new() };
        // `-d` prints the broker's SUBACK: from then on every answer reaches us.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match sub.lines.recv_timeout(left) {
                Ok(line) if line.contains("received SUBACK") => return Ok(sub),
                Ok(line) => sub.seen.push(line),
                Err(_) => bail!("mosquitto_sub got no SUBACK: {:?}\n{}", sub.seen, self.log()),
            }
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

/// A recording `mosquitto_sub -v`: its message lines are `<topic> <payload>`.
struct Subscription {
    child: Child,
    lines: mpsc::Receiver<String>,
    count: usize,
    seen: Vec<String>,
}

impl Subscription {
    /// The `count` messages received (topic, JSON payload), in order; fails if fewer came.
    fn finish(mut self, local: &Local) -> Result<Vec<(String, Value)>> {
        let mut messages = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while messages.len() < self.count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                let mut stderr = String::new();
                let _ = self.child.kill();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                bail!(
                    "{} of {} answers: {messages:#?}\nmosquitto_sub: {stderr}\n{}",
                    messages.len(),
                    self.count,
                    local.log()
                );
            };
            if let Some((topic, payload)) = line.split_once(' ').filter(|(t, _)| t.starts_with("$aws/")) {
                let body =
                    serde_json::from_str(payload).with_context(|| format!("answer on {topic}: {payload}"))?;
                messages.push((topic.to_owned(), body));
            }
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "mosquitto_sub exited {status} after {} messages", messages.len());
        Ok(messages)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
