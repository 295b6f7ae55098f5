//! [`CommandStore`] on SQLite: one row per command (JSON), indexed by thing and seq, and one
//! counter row per thing.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::commands::{CommandRecord, CommandStatus};
use crate::error::StoreError;
use crate::model::ThingName;
use crate::ports::CommandStore;

/// Migration step 13 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const COMMANDS_SCHEMA: &str = "
CREATE TABLE commands (
    cmd_id TEXT NOT NULL PRIMARY KEY,
    thing TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL -- the CommandRecord as JSON
) WITHOUT ROWID;
CREATE INDEX commands_by_thing ON commands (thing, seq);
CREATE TABLE command_seq (
    thing TEXT NOT NULL PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

fn encode(op: &'static str, c: &CommandRecord) -> Result<String, StoreError> {
    serde_json::to_string(c).map_err(|e| StoreError::permanent(op, e))
}

fn decode(op: &'static str, json: &str) -> Result<CommandRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::permanent(op, e))
}

impl CommandStore for SqliteStore {
    async fn next_seq(&self, thing: &ThingName) -> Result<u64, StoreError> {
        let thing = thing.to_string();
        let seq: i64 = self
            .with("sqlite command seq", move |c| {
                c.query_row(
                    "INSERT INTO command_seq (thing, seq) VALUES (?1, 1)
                     ON CONFLICT (thing) DO UPDATE SET seq = seq + 1 RETURNING seq",
                    [thing],
                    |r| r.get(0),
                )
            })
            .await?;
        Ok(seq as u64)
    }

    async fn put_command(&self, command: &CommandRecord) -> Result<(), StoreError> {
        const OP: &str = "sqlite command put";
        let row = (command.cmd_id.clone(), command.thing.clone(), command.seq as i64, encode(OP, command)?);
        let status = command.status.as_str();
        let inserted = self
            .with(OP, move |c| {
                c.execute(
                    "INSERT INTO commands (cmd_id, thing, seq, status, record) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (cmd_id) DO NOTHING",
                    params![row.0, row.1, row.2, status, row.3],
                )
            })
            .await?;
        if inserted == 0 {
            return Err(StoreError::conflict(OP, format!("command {} exists", command.cmd_id)));
        }
        Ok(())
    }

    async fn command(&self, cmd_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        const OP: &str = "sqlite command get";
        let id = cmd_id.to_owned();
        let json: Option<String> = self
            .with(OP, move |c| {
                c.query_row("SELECT record FROM commands WHERE cmd_id = ?1", [id], |r| r.get(0)).optional()
            })
            .await?;
        json.map(|j| decode(OP, &j)).transpose()
    }

    async fn commands_of(&self, thing: &ThingName, limit: usize) -> Result<Vec<CommandRecord>, StoreError> {
        const OP: &str = "sqlite commands of";
        let thing = thing.to_string();
        let rows: Vec<String> = self
            .with(OP, move |c| {
                let mut st = c.prepare_cached(
                    "SELECT record FROM commands WHERE thing = ?1 ORDER BY seq DESC LIMIT ?2",
                )?;
                let rows = st.query_map(params![thing, limit as i64], |r| r.get(0))?;
                rows.collect()
            })
            .await?;
        rows.iter().map(|j| decode(OP, j)).collect()
    }

    async fn settle_command(&self, command: &CommandRecord) -> Result<bool, StoreError> {
        const OP: &str = "sqlite command settle";
        let (id, json, status) = (command.cmd_id.clone(), encode(OP, command)?, command.status.as_str());
        let sent = CommandStatus::Sent.as_str();
        let changed = self
            .with(OP, move |c| {
                c.execute(
                    "UPDATE commands SET status = ?2, record = ?3 WHERE cmd_id = ?1 AND status = ?4",
                    params![id, status, json, sent],
                )
            })
            .await?;
        Ok(changed == 1)
    }
}
