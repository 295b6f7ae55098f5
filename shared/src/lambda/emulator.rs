//! A function's real bootstrap under cargo-lambda's Lambda runtime emulator, for end-to-end
//! tests (feature `test-support`): `cargo lambda watch --only-lambda-apis` serves the Runtime
//! API, the already-built binary (`env!("CARGO_BIN_EXE_<fn>")`) polls it exactly as it polls
//! Lambda's, and each event file goes through `cargo lambda invoke`. Nothing is compiled on the
//! way: the test build's binary is the one under test.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the emulator and the function get to start listening / polling.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long one invocation may take before it is reported as hung.
const INVOKE_DEADLINE: Duration = Duration::from_secs(60);

/// The function name cargo-lambda's emulator routes to a function it did not start itself.
const EXTERNAL_FUNCTION: &str = "_";

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("{what} (is cargo-lambda on PATH? scripts/test.sh installs it): {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
}

/// A child process group, stopped (group and all) on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

/// The emulator and one function process; both stop when this is dropped.
pub struct Emulator {
    port: u16,
    logs: PathBuf,
    // Field order is drop order: the function stops before the API it polls.
    function: Group,
    _apis: Group,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn spawn(command: &mut Command, log: &Path, what: &str) -> Result<Group, EmulatorError> {
    let spawn_err = |source| EmulatorError::Spawn { what: what.to_owned(), source };
    let out = std::fs::File::create(log).map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    Ok(Group(child))
}

impl Emulator {
    /// Start the runtime API on a free loopback port, then `binary` with `env` (plus the
    /// variables Lambda sets). `workspace` is the directory of the workspace's `Cargo.toml`
    /// (cargo-lambda reads its metadata); `logs` receives `apis.log` and `function.log`.
    pub fn start(
        workspace: &Path,
        binary: &Path,
        env: &[(&str, &str)],
        logs: &Path,
    ) -> Result<Self, EmulatorError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| EmulatorError::Spawn { what: "picking a loopback port".into(), source })?
            .port();
        let apis = spawn(
            Command::new(cargo())
                .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P"])
                .arg(port.to_string())
                .arg("--manifest-path")
                .arg(workspace.join("Cargo.toml"))
                .current_dir(logs),
            &logs.join("apis.log"),
            "starting cargo lambda watch --only-lambda-apis",
        )?;
        let mut apis = apis;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = apis.0.try_wait() {
                return Err(EmulatorError::Failed(format!(
                    "the runtime emulator exited ({status}): {}",
                    read(&logs.join("apis.log"))
                )));
            }
            if started.elapsed() > START_DEADLINE {
                return Err(EmulatorError::Failed(format!("the runtime emulator never listened on {port}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let function = spawn(
            Command::new(binary)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("AWS_LAMBDA_FUNCTION_NAME", EXTERNAL_FUNCTION)
                .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
                .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
                .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{port}/.rt"))
                .envs(env.iter().copied())
                .current_dir(logs),
            &logs.join("function.log"),
            &format!("starting {}", binary.display()),
        )?;
        Ok(Emulator { port, logs: logs.to_owned(), function, _apis: apis })
    }

    /// `cargo lambda invoke --data-file <event>`: the function's JSON answer, or its error
    /// (an `errorType` answer comes back as `Err` with cargo-lambda's message) with the
    /// function's log attached.
    pub fn invoke(&mut self, event: &Path) -> Result<serde_json::Value, EmulatorError> {
        if let Ok(Some(status)) = self.function.0.try_wait() {
            return Err(EmulatorError::Failed(format!(
                "the function exited ({status}) before {} was invoked:\n{}",
                event.display(),
                read(&self.logs.join("function.log"))
            )));
        }
        let out_path = self.logs.join("invoke.out");
        let err_path = self.logs.join("invoke.err");
        let spawn_err = |source| EmulatorError::Spawn { what: "running cargo lambda invoke".into(), source };
        let mut invoke = Group(
            Command::new(cargo())
                .args(["lambda", "invoke", EXTERNAL_FUNCTION, "-A", "127.0.0.1", "-P"])
                .arg(self.port.to_string())
                .args(["-o", "json", "--data-file"])
                .arg(event)
                .stdin(Stdio::null())
                .stdout(Stdio::from(std::fs::File::create(&out_path).map_err(spawn_err)?))
                .stderr(Stdio::from(std::fs::File::create(&err_path).map_err(spawn_err)?))
                .process_group(0)
                .spawn()
                .map_err(spawn_err)?,
        );
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = invoke.0.try_wait() {
                break status;
            }
            if started.elapsed() > INVOKE_DEADLINE {
                return Err(EmulatorError::Failed(format!(
                    "invoking {} got no answer within {INVOKE_DEADLINE:?}; function log:\n{}",
                    event.display(),
                    read(&self.logs.join("function.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read(&out_path).unwrap_or_default();
        if !status.success() {
            let exited = match self.function.0.try_wait() {
                Ok(Some(status)) => format!(" (the function exited: {status})"),
                _ => String::new(),
            };
            return Err(EmulatorError::Failed(format!(
                "invoking {} failed{exited}: {}\nfunction log:\n{}",
                event.display(),
                read(&err_path),
                read(&self.logs.join("function.log"))
            )));
        }
        serde_json::from_slice(&stdout).map_err(|e| {
            EmulatorError::Failed(format!(
                "invoke answered no JSON ({e}): {}",
                String::from_utf8_lossy(&stdout)
            ))
        })
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
