//! Archive objects: one gzip NDJSON object per batch, named by the SHA-256 of its body. The lines
//! are sorted and flate2 writes no time or name, so the same batch always gives the same bytes
//! and lands on the same key (replays overwrite, never add) within one build: another gzip
//! encoder or level (a flate2 upgrade) gives other bytes, so a batch archived before and
//! replayed after such a change lands on a second key. (Replays read the readings' own
//! identities, so the hot store is unaffected; a query over `raw/` would see the batch twice.)
//! The one digest also signs the upload (an object store's request signature hashes the body).
//!
//! - raw:        `raw/dt=YYYY-MM-DD/hour=HH/<sha256(body)[..32]>.ndjson.gz`, one original body per line
//! - quarantine: `quarantine/dt=YYYY-MM-DD/hour=HH/<sha256(body)[..32]>.ndjson.gz`, one [`QuarantineLine`] per line

use std::io::Write;

use base64::Engine;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::reason::Problem;
use crate::time::utc_date_hour;

pub const RAW_PREFIX: &str = "raw/";
pub const QUARANTINE_PREFIX: &str = "quarantine/";

/// An encoded archive object, ready for any object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveObject {
    key: String,
    /// gzip-compressed NDJSON.
    body: Vec<u8>,
    lines: usize,
    /// SHA-256 of `body` (the fields are private so that it always matches the body).
    sha256: [u8; 32],
}

impl ArchiveObject {
    /// An object holding `body` under `key`.
    pub fn new(key: String, body: Vec<u8>, lines: usize) -> Self {
        let sha256 = Sha256::digest(&body).into();
        Self { key, body, lines, sha256 }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// gzip-compressed NDJSON.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// How many lines (messages) it holds.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// SHA-256 of the body, lowercase hex: the payload hash a SigV4 upload of it carries.
    pub fn body_sha256_hex(&self) -> String {
        hex(&self.sha256)
    }
}

/// One quarantined message as archived: the original bytes and every reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineLine {
    pub message_id: String,
    pub received_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub thing: Option<String>,
    /// The MQTT topic the device published on, when the rule forwarded it (`topic() AS topic`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub topic: Option<String>,
    pub reasons: Vec<Problem>,
    /// The original payload when it is UTF-8 ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body: Option<String>,
    /// ... and base64 of it when it is not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_b64: Option<String>,
}

impl QuarantineLine {
    pub fn new(
        message_id: &str,
        received_ms: i64,
        thing: Option<String>,
        reasons: Vec<Problem>,
        body: &[u8],
    ) -> Self {
        let (body, body_b64) = match std::str::from_utf8(body) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(body))),
        };
        Self { message_id: message_id.to_owned(), received_ms, thing, topic: None, reasons, body, body_b64 }
    }

    /// The same line, saying which topic the message came from.
    pub fn with_topic(self, topic: Option<String>) -> Self {
        Self { topic, ..self }
    }

    /// The original payload bytes.
    pub fn original(&self) -> Vec<u8> {
        match (&self.body, &self.body_b64) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

/// What the topic rule added to a forwarded payload (`thing`, `topic`), read for the quarantine
/// record of a message that could not be decoded otherwise; `None` where it cannot be read.
pub fn rule_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Fields {
        thing: Option<String>,
        topic: Option<String>,
    }
    match serde_json::from_slice::<Fields>(body) {
        Ok(f) => (f.thing, f.topic),
        Err(_) => (None, None),
    }
}

/// Encode raw bodies (one message each) as the batch's raw archive object.
/// Lines are sorted, so the key does not depend on delivery order.
pub fn raw_object<'a>(bodies: impl IntoIterator<Item = &'a [u8]>, received_ms: i64) -> Option<ArchiveObject> {
    let bodies: Vec<&[u8]> = bodies.into_iter().collect();
    if bodies.iter().any(|b| b.contains(&b'\n') || b.contains(&b'\r')) {
        return encode(RAW_PREFIX, bodies.into_iter().map(one_line).collect(), received_ms);
    }
    // The usual batch: every body is one line already, sorted and written without a copy.
    encode(RAW_PREFIX, bodies, received_ms)
}

/// Encode quarantined messages as the batch's quarantine object.
pub fn quarantine_object(entries: &[QuarantineLine], received_ms: i64) -> Option<ArchiveObject> {
    let lines = entries.iter().map(|e| serde_json::to_vec(e).expect("QuarantineLine serialises")).collect();
    encode(QUARANTINE_PREFIX, lines, received_ms)
}

/// JSON never needs a raw newline (inside strings they are escaped), so any CR/LF byte is
/// whitespace between tokens: replacing it with a space keeps the JSON and makes one line.
pub fn one_line(body: &[u8]) -> Vec<u8> {
    body.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect()
}

/// The object of `lines`, sorted and without repeats (so the key depends neither on delivery
/// order nor on redeliveries within the batch).
fn encode<L: AsRef<[u8]> + Ord>(prefix: &str, mut lines: Vec<L>, received_ms: i64) -> Option<ArchiveObject> {
    lines.sort_unstable();
    lines.dedup();
    if lines.is_empty() {
        return None;
    }
    let mut ndjson = Vec::with_capacity(lines.iter().map(|l| l.as_ref().len() + 1).sum());
    for l in &lines {
        ndjson.extend_from_slice(l.as_ref());
        ndjson.push(b'\n');
    }
    let (date, hour) = utc_date_hour(received_ms);
    // flate2 writes mtime 0 and no name: the same input always gives the same bytes. The body
    // is named by its own hash (a fifth of the lines' bytes to hash), which signs it too.
    let mut gz = GzEncoder::new(Vec::with_capacity(ndjson.len() / 4), Compression::fast());
    gz.write_all(&ndjson).expect("writing to a Vec cannot fail");
    let body = gz.finish().expect("writing to a Vec cannot fail");
    let sha256: [u8; 32] = Sha256::digest(&body).into();
    Some(ArchiveObject {
        key: format!("{prefix}dt={date}/hour={hour:02}/{}.ndjson.gz", hex(&sha256[..16])),
        body,
        lines: lines.len(),
        sha256,
    })
}

/// A short, stable id of some bytes (first 128 bits of SHA-256, hex).
pub fn content_id(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes)[..16])
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Decode an archive object's body back into its lines.
pub fn decode_lines(gz_body: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    use std::io::Read;
    let mut ndjson = Vec::new();
    flate2::read::GzDecoder::new(gz_body).read_to_end(&mut ndjson)?;
    Ok(ndjson.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::reason::Reason;

    #[test]
    fn same_lines_in_any_order_give_the_same_key_and_bytes() -> anyhow::Result<()> {
        // GIVEN two deliveries of the same batch in different orders
        let a = raw_object([&b"{\"a\":1}"[..], b"{\"b\":2}"], 1_764_000_000_123)
            .ok_or_else(|| anyhow::anyhow!("empty"))?;
        let b = raw_object([&b"{\"b\":2}"[..], b"{\"a\":1}"], 1_764_000_000_123)
            .ok_or_else(|| anyhow::anyhow!("empty"))?;
        // THEN they are one object
        assert_eq!(a, b);
        assert!(a.key.starts_with("raw/dt=2025-11-24/hour=16/"), "{}", a.key);
        assert!(a.key.ends_with(".ndjson.gz"));
        assert_eq!(decode_lines(&a.body)?, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        Ok(())
    }

    #[test]
    fn the_key_and_the_upload_signature_carry_the_body_hash() -> anyhow::Result<()> {
        let o = raw_object([&b"{\"a\":1}"[..]], 0).ok_or_else(|| anyhow::anyhow!("empty"))?;
        let digest: String = Sha256::digest(&o.body).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(o.body_sha256_hex(), digest);
        assert_eq!(o.key, format!("raw/dt=1970-01-01/hour=00/{}.ndjson.gz", &digest[..32]));
        assert_eq!(ArchiveObject::new(o.key.clone(), o.body.clone(), o.lines), o);
        Ok(())
    }

    #[test]
    fn multi_line_json_becomes_one_line() -> anyhow::Result<()> {
        let o =
            raw_object([&b"{\n  \"a\": \"x\\ny\"\r\n}"[..]], 0).ok_or_else(|| anyhow::anyhow!("empty"))?;
        let lines = decode_lines(&o.body)?;
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&lines[0])?;
        assert_eq!(v["a"], "x\ny");
        Ok(())
    }

    #[test]
    fn bodies_are_sorted_and_deduplicated_as_their_lines_with_or_without_newlines() -> anyhow::Result<()> {
        let reference = |bodies: &[&[u8]]| {
            let mut lines: Vec<Vec<u8>> = bodies.iter().map(|b| one_line(b)).collect();
            lines.sort_unstable();
            lines.dedup();
            lines
        };
        let one_line_bodies: [&[u8]; 3] = [b"{\"b\":1}", b"{ \"a\":1}", b"{\"b\":1}"];
        let with_newlines: [&[u8]; 3] = [b"{\"b\":1}", b"{\n\"a\":1}", b"{ \"a\":1}"];
        for bodies in [&one_line_bodies[..], &with_newlines[..]] {
            let o = raw_object(bodies.iter().copied(), 0).ok_or_else(|| anyhow::anyhow!("empty"))?;
            assert_eq!(decode_lines(&o.body)?, reference(bodies));
            assert_eq!(o.lines, 2);
        }
        Ok(())
    }

    #[test]
    fn quarantine_keeps_non_utf8_bytes_as_base64() -> anyhow::Result<()> {
        let original = vec![0xff, 0xfe, b'{'];
        let line = QuarantineLine::new(
            "m1",
            0,
            None,
            vec![Problem::new(Reason::MalformedJson, None, "not JSON")],
            &original,
        );
        assert!(line.body.is_none());
        let o = quarantine_object(&[line], 0).ok_or_else(|| anyhow::anyhow!("empty"))?;
        assert!(o.key.starts_with("quarantine/dt=1970-01-01/hour=00/"));
        let back: QuarantineLine = serde_json::from_slice(&decode_lines(&o.body)?[0])?;
        assert_eq!(back.original(), original);
        assert_eq!(back.reasons[0].reason, Reason::MalformedJson);
        Ok(())
    }

    #[test]
    fn nothing_to_archive_is_no_object() {
        assert!(raw_object(std::iter::empty(), 0).is_none());
        assert!(quarantine_object(&[], 0).is_none());
    }
}
