//! The embedded backend: every port on one SQLite file (WAL mode, migrated schema), for the
//! local stack, `cargo lambda watch --features embedded` and tests. No AWS account needed.

mod sqlite;
mod twins;

pub use sqlite::{ContentConflict, SqliteStore};
