//! Signed firmware manifests: what an OTA campaign tells a device to install, signed by the
//! cloud so that a device installs only an image the operator released, for its class, byte for
//! byte (written to be ported to firmware as it stands, like [`crate::commands`]).
//!
//! # The manifest
//!
//! One JSON object, no other field allowed and none twice (field order and whitespace do not
//! matter, as the signature covers the signing bytes, not the text):
//!
//! ```json
//! {"fw":"1.5.0","class":"sensor","url":"https://firmware.example.com/sensor/1.5.0.bin",
//!  "sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","size":3,
//!  "kid":"fw2026","sig":"<88 characters of base64>"}
//! ```
//!
//! | field | rule |
//! | --- | --- |
//! | `fw` | the firmware version the image is: 1–48 characters of `A-Z a-z 0-9 . _ -`, the label devices report ([`crate::model::validate_label`]) |
//! | `class` | the device class the image is for, by the same rule; a device installs only its own class's firmware |
//! | `url` | where to download the image: 1–[`MAX_URL_BYTES`] bytes starting with `https://` or `http://`, each a printable ASCII character (`!` to `~`: no space, no control character) |
//! | `sha256` | the SHA-256 digest of the image: 64 lowercase hex digits |
//! | `size` | the image's length in bytes: 1 to [`MAX_IMAGE_BYTES`] (1 GiB) |
//! | `kid` | id of the signing key, 1–32 characters of `A-Z a-z 0-9 _ . -` (the command envelope's rule); a device trusts up to a few during a key rotation |
//! | `sig` | standard base64 (with `=` padding, no spare bits) of the 64-byte Ed25519 signature over the signing bytes |
//!
//! A whole manifest is at most [`MAX_MANIFEST_BYTES`], so a device can receive it into a fixed
//! buffer. In a job document it is embedded as this object, and deserializing it there
//! ([`FirmwareManifest`]'s `Deserialize`) applies the same rules, the size limit to its compact
//! form.
//!
//! # Signing bytes
//!
//! What the signature covers ([`FirmwareManifest::signing_bytes`]), byte for byte:
//!
//! 1. the 15 bytes `fleetline-fw-v1` and one `0x00` ([`DOMAIN`], 16 bytes), so that no
//!    signature over a manifest is ever a valid one over a command (`fleetline-cmd-v1`) or
//!    anything else the same key signs;
//! 2. `fw`, `class`, `url` as strings;
//! 3. the digest as its 32 raw bytes (not the hex text);
//! 4. `size` as 8 bytes big-endian unsigned;
//! 5. `kid` as a string.
//!
//! A *string* is its UTF-8 length as 4 bytes big-endian, then the UTF-8 bytes (all ASCII here).
//! The test vector (`signing_bytes_match_the_published_test_vector` below) gives a key seed, the
//! fields, the exact signing bytes and the signature, for a port to check itself.
//!
//! # What a device checks, in this order
//!
//! Each failure has a stable code ([`Malformed::code`], [`ManifestRejection::code`],
//! [`ImageMismatch::code`]) for the job execution's status details:
//!
//! 1. [`FirmwareManifest::parse`]: `too_large` (more than [`MAX_MANIFEST_BYTES`]),
//!    `invalid_json` (not one JSON object), `unknown_field`, `duplicate_field` (a key twice,
//!    however spelled: JSON parsers disagree on which of two equal keys wins),
//!    `missing_field`, `invalid_field` (a field of the wrong JSON type or breaking its rule).
//! 2. [`ManifestVerifier::verify`]: `unknown_kid` (no trusted key has this `kid`),
//!    `bad_signature` (Ed25519, RFC 8032, with *strict* verification: canonical `S`, no
//!    small-order public key or `R`). Only now may the device act on the manifest: compare
//!    `class` with its own and `fw` with what it runs, then download `url`.
//! 3. [`check_image`] on the downloaded image, before installing it: `size_mismatch` (checked
//!    first, and during the download a device can stop at `size` bytes), then
//!    `digest_mismatch`.
//!
//! The URL is trusted for nothing but finding the bytes: the signed digest is what makes an
//! image the released one, so a plain `http://` mirror cannot change what a device installs
//! (only `https://` keeps the image private).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::commands::{
    decode_hex, decode_signature, key_bytes, put_str, seed_from_text, KeyError, KID, SIG_RULE,
};
use crate::model::{validate_label, InvalidLabel};

/// Domain separation: the signing bytes start with this (module doc, "Signing bytes").
pub const DOMAIN: &[u8] = b"fleetline-fw-v1\0";

/// The largest manifest a device accepts and the cloud signs, in bytes of JSON text.
pub const MAX_MANIFEST_BYTES: usize = 2 * 1024;

/// The largest image a manifest may describe (1 GiB).
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// The longest `url`, in bytes.
pub const MAX_URL_BYTES: usize = 1024;

/// The fields, in the order they are published and checked.
const FIELDS: [&str; 7] = ["fw", "class", "url", "sha256", "size", "kid", "sig"];

const URL_RULE: &str = "1-1024 printable ASCII characters (no space) starting with https:// or http://";
const SHA256_RULE: &str = "64 lowercase hex digits";
const SIZE_RULE: &str = "an integer from 1 to 1073741824";
const STRING_RULE: &str = "a JSON string";

/// Why a manifest breaks the format; [`Malformed::code`] names the kind.
#[derive(Debug, Error)]
pub enum Malformed {
    #[error("{bytes} bytes, more than the {MAX_MANIFEST_BYTES} a firmware manifest may have")]
    TooLarge { bytes: usize },
    /// Not JSON, or not one JSON object.
    #[error("not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("field `{0}` appears twice")]
    DuplicateField(&'static str),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("`{field}` must be {rule}")]
    Field { field: &'static str, rule: &'static str },
    /// `fw` or `class` breaking the label rule.
    #[error(transparent)]
    Label(#[from] InvalidLabel),
}

impl Malformed {
    /// The stable code a device reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Json(_) => "invalid_json",
            Self::UnknownField(_) => "unknown_field",
            Self::DuplicateField(_) => "duplicate_field",
            Self::MissingField(_) => "missing_field",
            Self::Field { .. } | Self::Label(_) => "invalid_field",
        }
    }
}

/// What the cloud decides to release; [`ManifestSigner::sign`] adds `kid` and `sig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedManifest {
    pub fw: String,
    pub class: String,
    pub url: String,
    /// The image's SHA-256 digest.
    pub sha256: [u8; 32],
    /// The image's length in bytes.
    pub size: u64,
}

impl UnsignedManifest {
    /// The manifest of `image`, its digest and size computed.
    pub fn for_image(
        fw: impl Into<String>,
        class: impl Into<String>,
        url: impl Into<String>,
        image: &[u8],
    ) -> Self {
        Self {
            fw: fw.into(),
            class: class.into(),
            url: url.into(),
            sha256: Sha256::digest(image).into(),
            size: image_len(image),
        }
    }

    /// Every field rule, with `kid` the key's id.
    fn check(&self, kid: &str) -> Result<(), Malformed> {
        validate_label("fw", &self.fw)?;
        validate_label("class", &self.class)?;
        let scheme = self.url.starts_with("https://") || self.url.starts_with("http://");
        let printable = self.url.bytes().all(|b| b.is_ascii_graphic());
        if !(scheme && printable && self.url.len() <= MAX_URL_BYTES) {
            return Err(Malformed::Field { field: "url", rule: URL_RULE });
        }
        if !(1..=MAX_IMAGE_BYTES).contains(&self.size) {
            return Err(Malformed::Field { field: "size", rule: SIZE_RULE });
        }
        if !KID.admits(kid) {
            return Err(Malformed::Field { field: "kid", rule: KID.rule() });
        }
        Ok(())
    }

    /// The module doc's signing bytes of this manifest under the key `kid`.
    fn signing_bytes(&self, kid: &str) -> Vec<u8> {
        let strings = [&self.fw, &self.class, &self.url, kid].map(|s| 4 + s.len());
        let mut out = Vec::with_capacity(DOMAIN.len() + strings.iter().sum::<usize>() + 32 + 8);
        out.extend_from_slice(DOMAIN);
        put_str(&mut out, &self.fw);
        put_str(&mut out, &self.class);
        put_str(&mut out, &self.url);
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.size.to_be_bytes());
        put_str(&mut out, kid);
        out
    }
}

/// A signed manifest. Every value keeps the module doc's rules: it is made only by
/// [`Self::parse`], by deserializing, or by [`ManifestSigner::sign`], all of which check them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareManifest {
    unsigned: UnsignedManifest,
    kid: String,
    sig: Signature,
}

impl FirmwareManifest {
    /// Reads a manifest and checks every rule that needs no key (module doc, step 1).
    pub fn parse(raw: &[u8]) -> Result<Self, Malformed> {
        if raw.len() > MAX_MANIFEST_BYTES {
            return Err(Malformed::TooLarge { bytes: raw.len() });
        }
        let Members(members) = serde_json::from_slice(raw)?;
        Self::from_members(members)
    }

    /// The bytes the signature covers (module doc, "Signing bytes"): everything but `sig`.
    pub fn signing_bytes(&self) -> Vec<u8> {
        self.unsigned.signing_bytes(&self.kid)
    }

    /// Compact JSON, as published.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("strings and an integer always serialize")
    }

    pub fn fw(&self) -> &str {
        &self.unsigned.fw
    }

    pub fn class(&self) -> &str {
        &self.unsigned.class
    }

    pub fn url(&self) -> &str {
        &self.unsigned.url
    }

    /// The image's SHA-256 digest.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.unsigned.sha256
    }

    /// The image's length in bytes.
    pub fn size(&self) -> u64 {
        self.unsigned.size
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The object's members checked field by field, in [`FIELDS`] order.
    fn from_members(members: Vec<(String, Value)>) -> Result<Self, Malformed> {
        let mut values: [Option<Value>; FIELDS.len()] = Default::default();
        for (key, value) in members {
            let Some(at) = FIELDS.iter().position(|field| *field == key) else {
                return Err(Malformed::UnknownField(key));
            };
            if values[at].replace(value).is_some() {
                return Err(Malformed::DuplicateField(FIELDS[at]));
            }
        }
        let [fw, class, url, sha256, size, kid, sig] = values;
        let unsigned = UnsignedManifest {
            fw: string("fw", fw)?,
            class: string("class", class)?,
            url: string("url", url)?,
            sha256: digest_from_hex(&string("sha256", sha256)?)?,
            size: match size {
                None => return Err(Malformed::MissingField("size")),
                Some(size) => size.as_u64().ok_or(Malformed::Field { field: "size", rule: SIZE_RULE })?,
            },
        };
        let kid = string("kid", kid)?;
        let sig = string("sig", sig)?;
        unsigned.check(&kid)?;
        let sig = decode_signature(&sig).ok_or(Malformed::Field { field: "sig", rule: SIG_RULE })?;
        Ok(Self { unsigned, kid, sig })
    }

    /// `self` if its compact JSON fits [`MAX_MANIFEST_BYTES`].
    fn within_size(self) -> Result<Self, Malformed> {
        let bytes = self.to_json().len();
        if bytes > MAX_MANIFEST_BYTES {
            return Err(Malformed::TooLarge { bytes });
        }
        Ok(self)
    }
}

impl Serialize for FirmwareManifest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Published<'a> {
            fw: &'a str,
            class: &'a str,
            url: &'a str,
            sha256: String,
            size: u64,
            kid: &'a str,
            sig: String,
        }
        Published {
            fw: &self.unsigned.fw,
            class: &self.unsigned.class,
            url: &self.unsigned.url,
            sha256: hex(&self.unsigned.sha256),
            size: self.unsigned.size,
            kid: &self.kid,
            sig: STANDARD.encode(self.sig.to_bytes()),
        }
        .serialize(serializer)
    }
}

/// Every rule of [`FirmwareManifest::parse`] (the size limit on the compact form, as the text's
/// own length is not known here), so a manifest embedded in a job document is checked too.
/// A repeated key is caught only when reading JSON text: a `serde_json::Value` has already
/// kept one of the two.
impl<'de> Deserialize<'de> for FirmwareManifest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Members(members) = Members::deserialize(deserializer)?;
        Self::from_members(members).and_then(Self::within_size).map_err(D::Error::custom)
    }
}

/// A JSON object's members in their order, a repeated key kept, so that the checks can say
/// which field is at fault in a [`Malformed`] rather than in a serde message.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::with_capacity(FIELDS.len());
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Object)
    }
}

fn string(field: &'static str, value: Option<Value>) -> Result<String, Malformed> {
    match value {
        None => Err(Malformed::MissingField(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Malformed::Field { field, rule: STRING_RULE }),
    }
}

fn digest_from_hex(text: &str) -> Result<[u8; 32], Malformed> {
    let bad = Malformed::Field { field: "sha256", rule: SHA256_RULE };
    if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad);
    }
    decode_hex(text).and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()).ok_or(bad)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image's length as `size` counts it (saturating where `usize` is wider than 64 bits).
fn image_len(image: &[u8]) -> u64 {
    u64::try_from(image.len()).unwrap_or(u64::MAX)
}

/// Signs manifests with one key; `kid` names it to devices. Keys load as for
/// [`crate::commands::CommandSigner`] (a 32-byte seed, as hex or base64 text), but a firmware
/// key should be its own: devices trust it for a different power.
#[derive(Debug)]
pub struct ManifestSigner {
    kid: String,
    key: SigningKey,
}

impl ManifestSigner {
    /// A signer from the key's 32-byte seed.
    pub fn from_bytes(kid: impl Into<String>, seed: &[u8; 32]) -> Result<Self, KeyError> {
        let kid = kid.into();
        KID.check("kid", &kid)?;
        Ok(Self { kid, key: SigningKey::from_bytes(seed) })
    }

    /// A signer from the seed written as 64 hex digits or standard base64 (as key files hold it);
    /// surrounding whitespace is ignored.
    pub fn from_text(kid: impl Into<String>, text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(kid, &seed_from_text(text)?)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, for devices' trusted keys.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Checks `manifest` against the rules and signs it under this key.
    pub fn sign(&self, manifest: UnsignedManifest) -> Result<FirmwareManifest, Malformed> {
        manifest.check(&self.kid)?;
        let sig = self.key.sign(&manifest.signing_bytes(&self.kid));
        FirmwareManifest { unsigned: manifest, kid: self.kid.clone(), sig }.within_size()
    }
}

/// Why a device refuses a well-formed manifest; [`ManifestRejection::code`] says it in a word.
#[derive(Debug, Error)]
pub enum ManifestRejection {
    #[error("no trusted key has the id `{kid}`")]
    UnknownKid { kid: String },
    #[error("the signature does not verify under the trusted key `{kid}`")]
    BadSignature { kid: String },
}

impl ManifestRejection {
    /// The stable code a device reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownKid { .. } => "unknown_kid",
            Self::BadSignature { .. } => "bad_signature",
        }
    }
}

/// Where campaigns (fleetctl, ota-orchestrator) find the firmware keys they trust.
pub const FIRMWARE_KEYS_VAR: &str = "FLEET_FIRMWARE_KEYS";

/// The keys a device trusts to sign its firmware.
#[derive(Debug, Clone)]
pub struct ManifestVerifier {
    trusted: Vec<(String, VerifyingKey)>,
}

impl ManifestVerifier {
    /// `(kid, key)` pairs; two during a key rotation.
    pub fn new(trusted: Vec<(String, VerifyingKey)>) -> Self {
        Self { trusted }
    }

    /// No key is trusted: every manifest is refused.
    pub fn is_empty(&self) -> bool {
        self.trusted.is_empty()
    }

    /// From `kid=public-key` pairs, comma-separated (the keys as [`verifying_key_from_text`]
    /// reads them), as [`FIRMWARE_KEYS_VAR`] holds them; at least one.
    pub fn from_keys_text(text: &str) -> Result<Self, String> {
        let mut trusted = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kid, key) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not kid=public-key"))?;
            let key = verifying_key_from_text(key).map_err(|e| format!("firmware key {kid}: {e}"))?;
            trusted.push((kid.trim().to_owned(), key));
        }
        if trusted.is_empty() {
            return Err("no trusted firmware key".to_owned());
        }
        Ok(Self { trusted })
    }

    /// The keys in [`FIRMWARE_KEYS_VAR`]; an error names the variable.
    pub fn from_env(env: &crate::Env) -> Result<Self, crate::ConfigError> {
        let text = env.required(FIRMWARE_KEYS_VAR)?;
        Self::from_keys_text(&text).map_err(|_| crate::ConfigError::Invalid {
            var: FIRMWARE_KEYS_VAR,
            value: text,
            expected: "kid=public-key[,kid=public-key], each key 32 bytes in hex or base64",
        })
    }

    /// Module doc, step 2: whether a trusted key signed `manifest`.
    pub fn verify(&self, manifest: &FirmwareManifest) -> Result<(), ManifestRejection> {
        let kid = &manifest.kid;
        let (_, key) = self
            .trusted
            .iter()
            .find(|(trusted, _)| trusted == kid)
            .ok_or_else(|| ManifestRejection::UnknownKid { kid: kid.clone() })?;
        key.verify_strict(&manifest.signing_bytes(), &manifest.sig)
            .map_err(|_| ManifestRejection::BadSignature { kid: kid.clone() })
    }
}

/// Why a downloaded image is not the one a manifest describes.
#[derive(Debug, Error)]
pub enum ImageMismatch {
    #[error("the image has {actual} bytes, the manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the image's sha256 is {}, the manifest says {}", hex(.actual), hex(.expected))]
    Digest { expected: [u8; 32], actual: [u8; 32] },
}

impl ImageMismatch {
    /// The stable code a device reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Size { .. } => "size_mismatch",
            Self::Digest { .. } => "digest_mismatch",
        }
    }
}

/// Module doc, step 3: whether `image` is the one `manifest` describes, its size first.
pub fn check_image(manifest: &FirmwareManifest, image: &[u8]) -> Result<(), ImageMismatch> {
    let (expected, actual) = (manifest.size(), image_len(image));
    if actual != expected {
        return Err(ImageMismatch::Size { expected, actual });
    }
    let actual: [u8; 32] = Sha256::digest(image).into();
    if actual != *manifest.sha256() {
        return Err(ImageMismatch::Digest { expected: *manifest.sha256(), actual });
    }
    Ok(())
}

/// Why a public key's text is not an Ed25519 public key.
#[derive(Debug, Error)]
pub enum PublicKeyError {
    #[error("public key text is neither hex nor standard base64: {0}")]
    Encoding(#[from] base64::DecodeError),
    #[error("an Ed25519 public key has 32 bytes, this text holds {0}")]
    WrongLength(usize),
    #[error("32 bytes that are not an Ed25519 public key: {0}")]
    NotAKey(#[source] ed25519_dalek::SignatureError),
}

/// A trusted key from its text: 32 bytes as 64 hex digits or standard base64 (surrounding
/// whitespace ignored), as the signing keys' seeds are written.
pub fn verifying_key_from_text(text: &str) -> Result<VerifyingKey, PublicKeyError> {
    let bytes = key_bytes(text)?;
    let bytes =
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| PublicKeyError::WrongLength(bytes.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(PublicKeyError::NotAKey)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const URL: &str = "https://firmware.example.com/sensor/1.5.0.bin";

    fn signer(seed: u8, kid: &str) -> Result<ManifestSigner, KeyError> {
        ManifestSigner::from_bytes(kid, &[seed; 32])
    }

    fn trusted(signer: &ManifestSigner) -> (String, VerifyingKey) {
        (signer.kid().to_owned(), signer.verifying_key())
    }

    fn release(image: &[u8]) -> UnsignedManifest {
        UnsignedManifest::for_image("1.5.0", "sensor", URL, image)
    }

    /// The manifest as a JSON object, to be changed in ways the types would not allow.
    fn fields(manifest: &FirmwareManifest) -> Result<Map<String, Value>, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(manifest)?)
    }

    #[test]
    fn signing_bytes_match_the_published_test_vector() -> TestResult {
        // GIVEN the key seed 00 01 .. 1f named fw2026, and the image "abc" (whose SHA-256 is
        // FIPS 180-2's first example)
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let cloud = ManifestSigner::from_bytes("fw2026", &seed)?;

        // WHEN its manifest is signed
        let signed = cloud.sign(release(b"abc"))?;

        // THEN the signing bytes, the public key, the signature and the published text are
        // exactly these (as Python's struct and hashlib with OpenSSL's Ed25519 also give them),
        // and a device trusting the key accepts it
        let expected = concat!(
            "666c6565746c696e652d66772d763100", // "fleetline-fw-v1\0"
            "00000005",
            "312e352e30", // fw "1.5.0"
            "00000006",
            "73656e736f72", // class "sensor"
            "0000002d",     // url, 45 bytes
            "68747470733a2f2f6669726d776172652e6578616d706c652e636f6d2f73656e736f722f312e352e302e62696e",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", // sha256("abc")
            "0000000000000003",                                                 // size 3
            "00000006",
            "667732303236", // kid "fw2026"
        );
        assert_eq!(hex(&signed.signing_bytes()), expected);
        assert_eq!(
            hex(cloud.verifying_key().as_bytes()),
            "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        assert_eq!(
            signed.to_json(),
            concat!(
                r#"{"fw":"1.5.0","class":"sensor","url":"https://firmware.example.com/sensor/1.5.0.bin","#,
                r#""sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","size":3,"#,
                r#""kid":"fw2026","sig":"UUgvnSU+4caBU7T6kchT1i1HWabkManVh26cX/z5AGvH9du0fBr/0fSzpATOr6ecwH1BczI07FM7tWh8pnkzAQ=="}"#,
            )
        );
        let device = ManifestVerifier::new(vec![trusted(&cloud)]);
        device.verify(&FirmwareManifest::parse(signed.to_json().as_bytes())?)?;
        Ok(())
    }

    #[test]
    fn a_signed_manifest_parses_back_as_published_and_verifies() -> TestResult {
        // GIVEN a device trusting the cloud's key during a rotation, and a manifest signed with it
        let cloud = signer(1, "fw2026")?;
        let device = ManifestVerifier::new(vec![trusted(&signer(2, "fw2025")?), trusted(&cloud)]);
        let signed = cloud.sign(release(b"image bytes"))?;

        // WHEN the device parses the published text, pretty-printed with its fields reordered
        let mut reordered: Vec<(String, Value)> = fields(&signed)?.into_iter().collect();
        reordered.reverse();
        let pretty = serde_json::to_vec_pretty(&reordered.into_iter().collect::<Map<_, _>>())?;
        let got = FirmwareManifest::parse(&pretty)?;

        // THEN it is the signed manifest, and it verifies
        assert_eq!(got, signed);
        assert_eq!(
            (got.fw(), got.class(), got.url(), got.size(), got.kid()),
            ("1.5.0", "sensor", URL, 11, "fw2026")
        );
        device.verify(&got)?;
        Ok(())
    }

    #[test]
    fn changing_any_signed_field_fails_verification() -> TestResult {
        // GIVEN a device trusting two keys and a manifest signed with the first
        let (cloud, other) = (signer(1, "fw1")?, signer(2, "fw2")?);
        let device = ManifestVerifier::new(vec![trusted(&cloud), trusted(&other)]);
        let signed = cloud.sign(release(b"image bytes"))?;
        device.verify(&signed)?;

        // WHEN each signed field is changed in turn (`kid` once to the other trusted key's, once
        // to an unknown one), published and parsed again
        let changes: [fn(&mut FirmwareManifest); 8] = [
            |m| m.unsigned.fw = "1.5.1".into(),
            |m| m.unsigned.class = "gateway".into(),
            |m| m.unsigned.url = "https://firmware.example.com/sensor/1.5.1.bin".into(),
            |m| m.unsigned.sha256[31] ^= 1,
            |m| m.unsigned.size += 1,
            |m| m.kid = "fw2".into(),
            |m| m.kid = "fw9".into(),
            |_| {},
        ];
        let mut codes = Vec::new();
        for change in changes {
            let mut changed = signed.clone();
            change(&mut changed);
            let published = FirmwareManifest::parse(changed.to_json().as_bytes())?;
            codes.push(device.verify(&published).err().map(|e| e.code()));
        }

        // THEN each change is refused, and only the unchanged manifest passes
        let mut expected = vec![Some("bad_signature"); 6];
        expected.extend([Some("unknown_kid"), None]);
        assert_eq!(codes, expected);
        Ok(())
    }

    #[test]
    fn a_manifest_signed_by_an_impostor_under_a_trusted_kid_is_a_bad_signature() -> TestResult {
        // GIVEN a device trusting fw1, and an impostor whose own key also calls itself fw1
        let device = ManifestVerifier::new(vec![trusted(&signer(1, "fw1")?)]);
        let forged = signer(9, "fw1")?.sign(release(b"malware"))?;

        // WHEN the device verifies the forged manifest
        let outcome = device.verify(&forged);

        // THEN it is refused for its signature
        assert_eq!(outcome.err().map(|e| e.code()), Some("bad_signature"));
        Ok(())
    }

    #[test]
    fn rejects_every_single_bit_flip_of_a_published_manifest() -> TestResult {
        // GIVEN a published manifest that a device accepts
        let cloud = signer(1, "fw1")?;
        let device = ManifestVerifier::new(vec![trusted(&cloud)]);
        let original = cloud.sign(release(b"image bytes"))?.to_json().into_bytes();
        device.verify(&FirmwareManifest::parse(&original)?)?;

        // WHEN each bit of it is flipped, one at a time
        let mut accepted = Vec::new();
        for position in 0..original.len() {
            for mask in (0..8).map(|bit| 1u8 << bit) {
                let mut variant = original.clone();
                variant[position] ^= mask;
                let manifest = FirmwareManifest::parse(&variant);
                if manifest.is_ok_and(|m| device.verify(&m).is_ok()) {
                    accepted.push((position, mask));
                }
            }
        }

        // THEN no variant is both well formed and verified
        assert_eq!(accepted, []);
        Ok(())
    }

    #[test]
    fn parse_refuses_each_broken_rule_with_its_code() -> TestResult {
        // GIVEN a valid manifest's text, changed in one way each
        let signed = signer(1, "fw1")?.sign(release(b"image bytes"))?;
        let json = signed.to_json();
        let base = fields(&signed)?;
        let with = |field: &str, value: Value| -> Result<Vec<u8>, serde_json::Error> {
            let mut changed = base.clone();
            changed.insert(field.into(), value);
            serde_json::to_vec(&changed)
        };
        let without = |field: &str| -> Result<Vec<u8>, serde_json::Error> {
            let mut changed = base.clone();
            changed.remove(field);
            serde_json::to_vec(&changed)
        };
        let sha256 = base["sha256"].as_str().ok_or("no sha256")?;
        let sig = base["sig"].as_str().ok_or("no sig")?;
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            ("a key twice", json.replacen('{', r#"{"size":11,"#, 1).into_bytes(), "duplicate_field", "size"),
            (
                "a key twice, once escaped",
                json.replacen('{', r#"{"\u0066w":"1.5.0","#, 1).into_bytes(),
                "duplicate_field",
                "fw",
            ),
            ("an unknown field", with("signature", json!(sig))?, "unknown_field", "signature"),
            ("a missing field", without("sig")?, "missing_field", "sig"),
            ("uppercase sha256", with("sha256", json!(sha256.to_uppercase()))?, "invalid_field", "sha256"),
            ("short sha256", with("sha256", json!(sha256[1..]))?, "invalid_field", "sha256"),
            (
                "sha256 in base64",
                with("sha256", json!(STANDARD.encode(signed.sha256())))?,
                "invalid_field",
                "sha256",
            ),
            ("zero size", with("size", json!(0))?, "invalid_field", "size"),
            ("a size above 1 GiB", with("size", json!(MAX_IMAGE_BYTES + 1))?, "invalid_field", "size"),
            ("a fractional size", with("size", json!(11.0))?, "invalid_field", "size"),
            ("a size as a string", with("size", json!("11"))?, "invalid_field", "size"),
            ("a control character in url", with("url", json!(format!("{URL}\n")))?, "invalid_field", "url"),
            ("DEL in url", with("url", json!(format!("{URL}\u{7f}")))?, "invalid_field", "url"),
            (
                "a space in url",
                with("url", json!("https://firmware.example.com/a b.bin"))?,
                "invalid_field",
                "url",
            ),
            (
                "non-ASCII in url",
                with("url", json!("https://firmware.example.com/é.bin"))?,
                "invalid_field",
                "url",
            ),
            ("an ftp url", with("url", json!("ftp://firmware.example.com/a.bin"))?, "invalid_field", "url"),
            (
                "a url over 1024 bytes",
                with("url", json!(format!("https://{}", "a".repeat(1017))))?,
                "invalid_field",
                "url",
            ),
            ("fw not a label", with("fw", json!("1.5.0 beta"))?, "invalid_field", "fw"),
            ("class as a number", with("class", json!(7))?, "invalid_field", "class"),
            ("a kid over 32 characters", with("kid", json!("k".repeat(33)))?, "invalid_field", "kid"),
            ("sig without padding", with("sig", json!(sig.trim_end_matches('=')))?, "invalid_field", "sig"),
            ("not JSON", b"fw=1.5.0".to_vec(), "invalid_json", "expected"),
            ("an array", format!("[{json}]").into_bytes(), "invalid_json", "a JSON object"),
            ("text after the object", format!("{json}{{}}").into_bytes(), "invalid_json", "trailing"),
            ("2049 bytes", format!("{json:<2049}").into_bytes(), "too_large", "2049 bytes"),
        ];

        // WHEN each is parsed
        let mut wrong = Vec::new();
        for (case, raw, code, mention) in &cases {
            match FirmwareManifest::parse(raw) {
                Err(e) if e.code() == *code && e.to_string().contains(mention) => {}
                outcome => wrong.push(format!("{case}: {outcome:?}")),
            }
        }

        // THEN each is refused with its code, naming what is wrong; padded to exactly the limit,
        // the manifest is still read
        assert_eq!(wrong, Vec::<String>::new());
        assert_eq!(FirmwareManifest::parse(format!("{json:<2048}").as_bytes())?, signed);
        Ok(())
    }

    #[test]
    fn signer_refuses_manifests_a_device_would_refuse() -> TestResult {
        // GIVEN manifests breaking one rule each, the last one too long only once its quotes
        // are escaped in JSON
        let cloud = signer(1, "fw1")?;
        let valid = release(b"image bytes");
        let broken = [
            UnsignedManifest { fw: String::new(), ..valid.clone() },
            UnsignedManifest { class: "sensor/v2".into(), ..valid.clone() },
            UnsignedManifest { url: "firmware.example.com/a.bin".into(), ..valid.clone() },
            UnsignedManifest { url: format!("{URL}\t"), ..valid.clone() },
            UnsignedManifest { size: 0, ..valid.clone() },
            UnsignedManifest { size: MAX_IMAGE_BYTES + 1, ..valid.clone() },
            UnsignedManifest { url: format!("https://{}", "\"".repeat(1016)), ..valid.clone() },
        ];

        // WHEN the cloud signs them
        let codes: Vec<_> = broken.into_iter().map(|m| cloud.sign(m).err().map(|e| e.code())).collect();

        // THEN none is signed, while the longest url and the largest size are
        let mut expected = vec![Some("invalid_field"); 6];
        expected.push(Some("too_large"));
        assert_eq!(codes, expected);
        let edges =
            UnsignedManifest { url: format!("https://{}", "a".repeat(1016)), size: MAX_IMAGE_BYTES, ..valid };
        let signed = cloud.sign(edges)?;
        assert_eq!(FirmwareManifest::parse(signed.to_json().as_bytes())?, signed);
        Ok(())
    }

    #[test]
    fn check_image_accepts_the_described_image_and_refuses_a_wrong_size_or_digest() -> TestResult {
        // GIVEN a manifest signed for an image
        let image = b"firmware 1.5.0 for sensors".to_vec();
        let manifest = signer(1, "fw1")?.sign(release(&image))?;
        let truncated = &image[..image.len() - 1];
        let mut corrupted = image.clone();
        corrupted[3] ^= 0x20;

        // WHEN the device checks that image, a truncated one and one with a bit flipped
        let outcomes = [&image[..], truncated, &corrupted].map(|i| check_image(&manifest, i).err());

        // THEN only the first passes; the others are refused by size, then by digest
        let codes = outcomes.each_ref().map(|o| o.as_ref().map(ImageMismatch::code));
        assert_eq!(codes, [None, Some("size_mismatch"), Some("digest_mismatch")]);
        assert!(matches!(outcomes[1], Some(ImageMismatch::Size { expected: 26, actual: 25 })));
        Ok(())
    }

    #[test]
    fn a_manifest_embedded_in_a_job_document_is_checked_when_read() -> TestResult {
        // GIVEN a job document embedding a signed manifest
        #[derive(Serialize, Deserialize)]
        struct JobDocument {
            operation: String,
            manifest: FirmwareManifest,
        }
        let signed = signer(1, "fw1")?.sign(release(b"image bytes"))?;
        let doc = serde_json::to_string(&JobDocument { operation: "ota".into(), manifest: signed.clone() })?;

        // WHEN it is read back as published, with a size of 0, and with a repeated field
        let read = serde_json::from_str::<JobDocument>(&doc)?;
        let zero = serde_json::from_str::<JobDocument>(&doc.replacen(r#""size":11"#, r#""size":0"#, 1));
        let twice =
            serde_json::from_str::<JobDocument>(&doc.replacen(r#""size":11"#, r#""size":11,"size":12"#, 1));

        // THEN the first gives the signed manifest back and the others are refused, saying why
        assert_eq!(read.manifest, signed);
        assert!(matches!(&zero, Err(e) if e.to_string().contains("`size` must be")), "{:?}", zero.err());
        assert!(
            matches!(&twice, Err(e) if e.to_string().contains("`size` appears twice")),
            "{:?}",
            twice.err()
        );
        Ok(())
    }

    #[test]
    fn keys_load_from_hex_or_base64_text() -> TestResult {
        // GIVEN a key's seed and its public key, each written as hex and as base64
        let seed = [0xab; 32];
        let public = signer(0xab, "fw1")?.verifying_key();

        // WHEN signers and trusted keys are loaded from the texts, and from wrong ones
        let from_hex = ManifestSigner::from_text("fw1", &hex(&seed))?;
        let from_base64 = ManifestSigner::from_text("fw1", &format!("{}\n", STANDARD.encode(seed)))?;
        let public_hex = verifying_key_from_text(&hex(public.as_bytes()))?;
        let public_base64 = verifying_key_from_text(&STANDARD.encode(public.as_bytes()))?;
        let too_long = verifying_key_from_text(&hex(&[1; 33]));
        let garbage = verifying_key_from_text("not a key!");
        let bad_kid = ManifestSigner::from_text("fw 1", &hex(&seed));

        // THEN they are all the same key, and the wrong texts say what is wrong
        assert_eq!(
            [from_hex.verifying_key(), from_base64.verifying_key(), public_hex, public_base64],
            [public; 4]
        );
        assert!(matches!(too_long, Err(PublicKeyError::WrongLength(33))), "{too_long:?}");
        assert!(matches!(garbage, Err(PublicKeyError::Encoding(_))), "{garbage:?}");
        assert!(matches!(bad_kid, Err(KeyError::Kid(_))), "{bad_kid:?}");
        Ok(())
    }
}
