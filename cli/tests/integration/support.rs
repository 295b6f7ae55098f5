//! What fleetctl's tests share: the binary, the workspace, and `fleetctl local` started on
//! ports the operating system picks (`--mqtt-port 0 --http-port 0`), read back from the
//! addresses it prints, so no two tests can race for a port.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub const FLEETCTL: &str = env!("CARGO_BIN_EXE_fleetctl");

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ sits in the workspace").to_path_buf()
}

/// `fleetctl --db <db> local` on the workspace's template, its output in `log`, in a process
/// group of its own (a signal to it reaches no test); returns once it prints where it listens.
pub fn spawn_local(db: &Path, log: &Path) -> Result<(Child, SocketAddr, SocketAddr)> {
    let out = std::fs::File::create(log)?;
    let mut child = Command::new(FLEETCTL)
        .arg("--db")
        .arg(db)
        .args(["local", "--mqtt-port", "0", "--http-port", "0", "--template"])
        .arg(workspace().join("infra/template.yaml"))
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .process_group(0)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let (Some(mqtt), Some(http)) =
            (address(&text, "mqtt://"), address(&text, "dashboard         http://"))
        {
            return Ok((child, mqtt, http));
        }
        let failed = match child.try_wait() {
            Ok(Some(status)) => Some(format!("fleetctl local exited ({status}): {text}")),
            Err(e) => Some(format!("fleetctl local: {e}: {text}")),
            Ok(None) if Instant::now() > deadline => {
                Some(format!("fleetctl local printed no addresses in 30 s: {text}"))
            }
            Ok(None) => None,
        };
        if let Some(why) = failed {
            let _ = child.kill();
            let _ = child.wait();
            bail!(why);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The address printed right after `prefix` on one of `text`'s lines.
fn address(text: &str, prefix: &str) -> Option<SocketAddr> {
    let at = text.find(prefix)? + prefix.len();
    let rest = &text[at..];
    let end = rest.find(|c: char| c == '/' || c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}
