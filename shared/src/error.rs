//! The adapter-layer error: which operation failed, whether retrying can help, and the
//! original SDK / SQLite error as its source.

use std::error::Error as StdError;

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether a failed call may succeed when retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling, 5xx, timeouts, connection failures, busy database.
    Transient,
    /// Validation, access denied, missing resource: retrying will not help.
    Permanent,
}

#[derive(Debug, thiserror::Error)]
#[error("{op} failed ({kind:?}): {source}")]
pub struct StoreError {
    pub op: &'static str,
    pub kind: ErrorKind,
    #[source]
    pub source: BoxError,
}

impl StoreError {
    pub fn transient(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self { op, kind: ErrorKind::Transient, source: source.into() }
    }

    pub fn permanent(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self { op, kind: ErrorKind::Permanent, source: source.into() }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}
