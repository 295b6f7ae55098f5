//! Connection churn: a fleet reconnecting after an outage, against `fleetctl local`.
//!
//! Starts `fleetctl local` (this build, or the binary in `$FLEETCTL`, to compare), then runs
//! `$CHURN_WAVES` (default 6) waves of `$CHURN_CONNECTIONS` (default 1,000) concurrent MQTT
//! connections, the same fleet every wave: each connects as its own device (client id = thing
//! name), publishes one reading at QoS 1 (a new sequence number each wave), waits for the
//! acknowledgement, and goes away (half with a DISCONNECT, half by dropping the socket). After
//! each wave it prints the local IoT Core's resident memory; at the end, the peak, the memory
//! after the last wave, what the waves left behind, the connect rate and failed connections.
//!
//! `cargo bench -p fleetctl --bench churn`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resident memory of `pid` in MB (VmRSS).
fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

struct Stack(Child);

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One device: connect, publish one reading, wait for its ack, go away. `Ok(connect time)`.
async fn device(port: u16, id: String, seq: usize, clean_disconnect: bool) -> Result<Duration> {
    let started = Instant::now();
    let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let payload = format!(r#"{{"v":1,"seq":{seq},"boot":1,"ts":{now},"m":{{"temp_c":21.5}}}}"#);
    client.publish(format!("dt/fleet/{id}/telemetry"), QoS::AtLeastOnce, false, payload).await?;
    let mut connected = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = Some(started.elapsed()),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{id}: {e}"),
            Err(_) => bail!("{id}: no acknowledgement within 30 s"),
        }
    }
    if clean_disconnect {
        client.disconnect().await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
    }
    // Dropping the event loop closes the socket (without DISCONNECT unless sent above).
    Ok(connected.unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<()> {
    let waves = env_or("CHURN_WAVES", 6);
    let connections = env_or("CHURN_CONNECTIONS", 1000);
    let fleetctl: PathBuf =
        std::env::var_os("FLEETCTL").map_or_else(|| env!("CARGO_BIN_EXE_fleetctl").into(), PathBuf::from);
    let dir = tempfile::tempdir()?;
    let (mqtt, http) = (free_port()?, free_port()?);
    let child = Command::new(&fleetctl)
        .arg("--db")
        .arg(dir.path().join("churn.sqlite"))
        .args(["local", "--mqtt-port", &mqtt.to_string(), "--http-port", &http.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", fleetctl.display()))?;
    let pid = child.id();
    let stack = Stack(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", mqtt)).await.is_err() {
        ensure!(Instant::now() < deadline, "fleetctl local did not listen on {mqtt}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_mb(pid)?;
    println!(
        "connection churn: {waves} waves x {connections} concurrent connections ({})",
        fleetctl.display()
    );
    println!("  before           RSS {baseline:>7.1} MB");
    let mut peak = baseline;
    let mut connect_times = Vec::new();
    let mut failures = 0usize;
    let started = Instant::now();
    for wave in 1..=waves {
        let tasks: Vec<_> = (0..connections)
            .map(|i| tokio::spawn(device(mqtt, format!("churn-{i:05}"), wave, i % 2 == 0)))
            .collect();
        let mut sampling = tokio::time::interval(Duration::from_millis(100));
        let all = futures_join(tasks);
        tokio::pin!(all);
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = sampling.tick() => peak = peak.max(rss_mb(pid)?),
            }
        };
        for r in results {
            match r.context("device task")? {
                Ok(t) => connect_times.push(t),
                Err(e) => {
                    failures += 1;
                    if failures <= 3 {
                        println!("  connection failed: {e:#}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_mb(pid)?;
        peak = peak.max(now);
        println!("  after wave {wave:<4}  RSS {now:>7.1} MB");
    }
    let elapsed = started.elapsed().as_secs_f64() - waves as f64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = rss_mb(pid)?;
    ensure!(!connect_times.is_empty(), "no connection succeeded");
    connect_times.sort();
    let p99 = connect_times[(connect_times.len() * 99 / 100).min(connect_times.len() - 1)];
    println!("  peak             RSS {peak:>7.1} MB");
    println!("  2 s after churn  RSS {end:>7.1} MB ({:+.1} MB over the start)", end - baseline);
    println!(
        "  {} connections (connect + publish + ack + close) in {elapsed:.1} s: {:.0}/s; connect p99 {} ms",
        waves * connections,
        (waves * connections) as f64 / elapsed,
        p99.as_millis()
    );
    println!("  failed connections {failures}");
    drop(stack);
    Ok(())
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}
