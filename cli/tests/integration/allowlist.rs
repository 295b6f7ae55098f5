//! `fleetctl allowlist add` on a local database: serial numbers that can become things, and
//! never a claim session's client id.

use std::process::Command;

use anyhow::{ensure, Result};
use serde_json::Value;

use crate::support::FLEETCTL;

#[test]
fn a_serial_shaped_like_a_claim_client_id_is_refused_and_nothing_of_the_command_is_added() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let add = |serials: &[&str]| {
        Command::new(FLEETCTL)
            .arg("--db")
            .arg(&db)
            .args(["allowlist", "add"])
            .args(serials)
            .args(["--class", "env-sensor", "--region", "eu-west"])
            .output()
    };
    // WHEN an operator allows a serial starting `claim-` among good ones
    let refused = add(&["sensor-1", "claim-sensor-2"])?;
    // THEN the command fails naming it, and adds none of them
    let err = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success() && err.contains("claim-sensor-2") && err.contains("claim-"), "{err}");
    let list = |db: &std::path::Path| -> Result<Value> {
        let out =
            Command::new(FLEETCTL).arg("--db").arg(db).args(["allowlist", "list", "--json"]).output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    ensure!(list(&db)?.as_array().is_some_and(Vec::is_empty), "{}", list(&db)?);
    // AND the good serial alone is allowed
    let added = add(&["sensor-1"])?;
    ensure!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let entries = list(&db)?;
    ensure!(entries.as_array().map(Vec::len) == Some(1) && entries[0]["serial"] == "sensor-1", "{entries}");
    Ok(())
}
