//! `ThingName`: the AWS IoT thing name, validated once at the edge of the system.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest thing name AWS IoT accepts.
pub const MAX_THING_NAME_LEN: usize = 128;

/// A thing name as AWS IoT allows it: 1–128 characters of `[a-zA-Z0-9:_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ThingName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid thing name {0:?}: expected 1-128 characters of [a-zA-Z0-9:_-]")]
pub struct InvalidThingName(pub String);

impl ThingName {
    pub fn parse(s: &str) -> Result<Self, InvalidThingName> {
        if Self::is_valid(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidThingName(s.to_owned()))
        }
    }

    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_THING_NAME_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ThingName {
    type Error = InvalidThingName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(InvalidThingName(s))
        }
    }
}

impl From<ThingName> for String {
    fn from(t: ThingName) -> Self {
        t.0
    }
}

impl std::str::FromStr for ThingName {
    type Err = InvalidThingName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ThingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ThingName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_iot_character_set_up_to_128_chars() {
        for ok in ["a", "sensor-01", "plant:line_2:dev-9", &"x".repeat(128)] {
            assert!(ThingName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        for bad in ["", &"x".repeat(129), "a/b", "a b", "dev#1", "dév", "a+b"] {
            assert_eq!(ThingName::parse(bad), Err(InvalidThingName(bad.to_owned())));
        }
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<ThingName>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<ThingName>("\"not ok\"").is_err());
    }
}
