//! The embedded backend: every port on one SQLite file (WAL mode), for the local stack,
//! `cargo lambda watch` and tests. No AWS account needed.

mod sqlite;

pub use sqlite::SqliteStore;
