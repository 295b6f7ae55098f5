//! The adapter-layer error: which operation failed, what kind of failure it is (and so what
//! the caller must do with the records it concerns), and the original SDK / SQLite error as
//! its source. Never flattened into a string on its way up.

use std::error::Error as StdError;

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What a failure means for the records it concerns. Decides retry vs quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// Throttling, 5xx, timeouts, connection failures, a busy database: retrying may succeed.
    Transient,
    /// Validation, access denied, a missing resource, a record the store refuses: retrying
    /// the same request cannot help. The records are quarantined with the reason.
    Permanent,
    /// A record with the same key but different content is already stored.
    Conflict,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Conflict => "conflict",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{op} failed ({kind}): {source}", kind = kind.as_str())]
pub struct StoreError {
    pub op: &'static str,
    pub kind: ErrorKind,
    #[source]
    pub source: BoxError,
}

impl StoreError {
    pub fn new(op: &'static str, kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Self { op, kind, source: source.into() }
    }

    pub fn transient(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self::new(op, ErrorKind::Transient, source)
    }

    pub fn permanent(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self::new(op, ErrorKind::Permanent, source)
    }

    pub fn conflict(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self::new(op, ErrorKind::Conflict, source)
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_source_and_names_the_kind() {
        let e = StoreError::permanent("timestream write", std::io::Error::other("ValidationException"));
        assert_eq!(e.to_string(), "timestream write failed (permanent): ValidationException");
        assert!(e.source().is_some_and(|s| s.to_string() == "ValidationException"));
        assert!(!e.is_transient());
    }
}
