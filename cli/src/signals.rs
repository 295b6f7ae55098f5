//! Stopping the local stack the way a process manager or a terminal asks: SIGINT (Ctrl-C) and
//! SIGTERM both start a graceful stop (drain what was acknowledged, then exit); a second signal
//! of either kind exits at once.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

/// Exit status after a second signal: 128 + SIGINT, as shells report an interrupted command.
const FORCED_EXIT: i32 = 130;

/// Wait for SIGINT or SIGTERM; returns its name.
pub async fn first_stop_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    })
}

/// From now on, a further SIGINT or SIGTERM ends the process without waiting for the drain.
pub fn exit_on_second_signal() {
    tokio::spawn(async {
        if first_stop_signal().await.is_ok() {
            eprintln!("second signal: exiting without waiting for the drain");
            std::process::exit(FORCED_EXIT);
        }
    });
}
