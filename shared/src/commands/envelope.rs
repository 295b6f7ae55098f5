//! The command envelope: its fields and their rules, strict parsing, and the signing bytes.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signature;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Domain separation: the signing bytes start with this, so a command signature can never be
/// taken for a signature over anything else the same key signs (and `v1` versions the format).
pub const DOMAIN: &[u8] = b"fleetline-cmd-v1\0";

/// The largest envelope a device accepts and the cloud signs, in bytes of compact JSON.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024;

/// A field made of ASCII letters, digits and a few punctuation characters.
pub(crate) struct Token {
    max: usize,
    punct: &'static [u8],
    rule: &'static str,
}

pub(super) const CMD_ID: Token = Token { max: 64, punct: b"_-", rule: "1-64 characters of A-Z a-z 0-9 _ -" };
const THING: Token = Token { max: 128, punct: b":_-", rule: "1-128 characters of A-Z a-z 0-9 : _ -" };
const NAME: Token = Token { max: 64, punct: b"_.-", rule: "1-64 characters of A-Z a-z 0-9 _ . -" };
/// A signing key's id; firmware manifests ([`crate::ota::manifest`]) name their key by the same rule.
pub(crate) const KID: Token = Token { max: 32, punct: b"_.-", rule: "1-32 characters of A-Z a-z 0-9 _ . -" };

impl Token {
    pub(crate) fn check(&self, field: &'static str, value: &str) -> Result<(), Malformed> {
        if self.admits(value) {
            Ok(())
        } else {
            Err(Malformed::Field { field, rule: self.rule })
        }
    }

    /// Whether `value` keeps the rule.
    pub(crate) fn admits(&self, value: &str) -> bool {
        (1..=self.max).contains(&value.len())
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || self.punct.contains(&b))
    }

    /// The rule in words, for error messages.
    pub(crate) fn rule(&self) -> &'static str {
        self.rule
    }
}

/// How `sig` is written, for error messages: [`decode_signature`] takes nothing else.
pub(crate) const SIG_RULE: &str = "standard padded base64 of 64 bytes";

/// Why a command envelope or an ack breaks the protocol (reason code `malformed`).
#[derive(Debug, Error)]
pub enum Malformed {
    #[error("{bytes} bytes, more than the {MAX_ENVELOPE_BYTES} a command envelope may have")]
    TooLarge { bytes: usize },
    /// Not JSON, or a missing, unknown, mistyped or repeated field (at any depth in `args`).
    #[error("not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`{field}` must be {rule}")]
    Field { field: &'static str, rule: &'static str },
    #[error("expires_at {expires_at} is before issued_at {issued_at}")]
    ExpiresBeforeIssued { issued_at: i64, expires_at: i64 },
    #[error("a lifetime of {ttl_ms} ms is longer than the {max_ttl_ms} ms this device allows")]
    TooLongLived { ttl_ms: u64, max_ttl_ms: u32 },
}

/// What the cloud decides to send; [`super::CommandSigner::sign`] adds `kid` and `sig`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnsignedCommand {
    pub cmd_id: String,
    pub thing: String,
    pub seq: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub name: String,
    pub args: Map<String, Value>,
}

/// A signed command as it travels on `cmd/fleet/<thing>/req`; the module doc gives the rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandEnvelope {
    pub cmd_id: String,
    pub thing: String,
    pub seq: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub name: String,
    #[serde(default, deserialize_with = "strict_object")]
    pub args: Map<String, Value>,
    pub kid: String,
    pub sig: String,
}

impl CommandEnvelope {
    /// Reads an envelope and checks every rule that needs neither a key, a clock nor state.
    pub fn parse(raw: &[u8]) -> Result<Self, Malformed> {
        if raw.len() > MAX_ENVELOPE_BYTES {
            return Err(Malformed::TooLarge { bytes: raw.len() });
        }
        let envelope: Self = serde_json::from_slice(raw)?;
        envelope.check()?;
        Ok(envelope)
    }

    pub(super) fn check(&self) -> Result<(), Malformed> {
        CMD_ID.check("cmd_id", &self.cmd_id)?;
        THING.check("thing", &self.thing)?;
        NAME.check("name", &self.name)?;
        KID.check("kid", &self.kid)?;
        if self.seq == 0 {
            return Err(Malformed::Field { field: "seq", rule: "at least 1" });
        }
        if self.expires_at < self.issued_at {
            return Err(Malformed::ExpiresBeforeIssued {
                issued_at: self.issued_at,
                expires_at: self.expires_at,
            });
        }
        if self.args.values().any(has_float) {
            return Err(Malformed::Field { field: "args", rule: "free of floating-point numbers" });
        }
        Ok(())
    }

    /// The bytes the signature covers (module doc, "Signing bytes"): everything but `sig`.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let args = canonical_json(&self.args);
        let strings = [&self.cmd_id, &self.thing, &self.name, &args, &self.kid];
        let mut out =
            Vec::with_capacity(DOMAIN.len() + 3 * 8 + strings.iter().map(|s| 4 + s.len()).sum::<usize>());
        out.extend_from_slice(DOMAIN);
        put_str(&mut out, &self.cmd_id);
        put_str(&mut out, &self.thing);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        put_str(&mut out, &self.name);
        put_str(&mut out, &args);
        put_str(&mut out, &self.kid);
        out
    }

    /// `sig` decoded ([`decode_signature`]).
    pub(super) fn signature(&self) -> Result<Signature, Malformed> {
        decode_signature(&self.sig).ok_or(Malformed::Field { field: "sig", rule: SIG_RULE })
    }

    /// Compact JSON, as published.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("strings, integers and a JSON map always serialize")
    }
}

/// A signature as `sig` carries it: strict standard base64 (canonical padding, no spare bits)
/// of 64 bytes; `None` for anything else.
pub(crate) fn decode_signature(sig: &str) -> Option<Signature> {
    let bytes = STANDARD.decode(sig).ok().and_then(|b| <[u8; 64]>::try_from(b).ok());
    bytes.map(|b| Signature::from_bytes(&b))
}

/// A *string* of the signing bytes: its UTF-8 length as 4 bytes big-endian, then its bytes.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("fields are bounded far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// `args` as compact JSON with every object's keys sorted, whatever serde_json's map order.
fn canonical_json(args: &Map<String, Value>) -> String {
    Value::Object(sorted_object(args)).to_string()
}

fn sorted_object(map: &Map<String, Value>) -> Map<String, Value> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_unstable_by_key(|&(key, _)| key);
    entries.into_iter().map(|(key, value)| (key.clone(), sorted(value))).collect()
}

fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(sorted_object(map)),
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// Deserializes a JSON object, refusing a key repeated at any depth: serde_json keeps the last
/// of two equal keys, a firmware parser may keep the first, and the two would then act on
/// different arguments under one valid signature.
pub(super) fn strict_object<'de, D: Deserializer<'de>>(de: D) -> Result<Map<String, Value>, D::Error> {
    struct Object;
    impl<'de> Visitor<'de> for Object {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            unique_keys(map)
        }
    }
    de.deserialize_map(Object)
}

fn unique_keys<'de, A: MapAccess<'de>>(mut map: A) -> Result<Map<String, Value>, A::Error> {
    let mut out = Map::new();
    while let Some(key) = map.next_key::<String>()? {
        if out.contains_key(&key) {
            return Err(A::Error::custom(format_args!("key `{key}` appears twice")));
        }
        let value = map.next_value_seed(StrictValue)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// Any JSON value, with [`unique_keys`] in every object.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        unique_keys(map).map(Value::Object)
    }
}
