//! Cloud → device commands: signed, sequenced, expiring envelopes on `cmd/fleet/<thing>/req`,
//! the device's acknowledgement on `cmd/fleet/<thing>/res`, and the check a device runs before
//! it acts on a command (written to be ported to firmware as it stands).
//!
//! # The envelope
//!
//! One JSON object, no other field allowed and none twice (published compact; field order and
//! whitespace do not matter, as the signature covers the signing bytes, not the text):
//!
//! ```json
//! {"cmd_id":"c-0001","thing":"sensor-42","seq":7,"issued_at":1700000000000,
//!  "expires_at":1700000060000,"name":"valve.set","args":{"level":3},"kid":"k2024",
//!  "sig":"<88 characters of base64>"}
//! ```
//!
//! | field | rule |
//! | --- | --- |
//! | `cmd_id` | 1–64 characters of `A-Z a-z 0-9 _ -`; echoed in the ack |
//! | `thing` | the target thing (1–128 characters of `A-Z a-z 0-9 : _ -`). Signed, so a command for one device cannot be replayed to another; the topic is not signed |
//! | `seq` | per-device counter, starts at 1; the cloud keeps one counter per thing |
//! | `issued_at`, `expires_at` | Unix milliseconds, `issued_at <= expires_at` |
//! | `name` | 1–64 characters of `A-Z a-z 0-9 _ . -` |
//! | `args` | an object (default `{}`), no key twice at any depth, no floating-point numbers |
//! | `kid` | id of the signing key, 1–32 characters of `A-Z a-z 0-9 _ . -`; a device trusts up to a few during a key rotation |
//! | `sig` | standard base64 (with `=` padding, no spare bits) of the 64-byte Ed25519 signature over the signing bytes |
//!
//! A whole envelope is at most [`MAX_ENVELOPE_BYTES`], so a device can receive into a fixed buffer.
//!
//! # Signing bytes
//!
//! What the signature covers ([`CommandEnvelope::signing_bytes`]), byte for byte:
//!
//! 1. the 16 bytes `fleetline-cmd-v1` and one `0x00` ([`DOMAIN`], 17 bytes);
//! 2. `cmd_id`, `thing` as strings;
//! 3. `seq` as 8 bytes big-endian unsigned; `issued_at`, `expires_at` as 8 bytes big-endian
//!    two's complement each;
//! 4. `name`, then the canonical JSON of `args`, then `kid`, as strings.
//!
//! A *string* is its UTF-8 length as 4 bytes big-endian, then the UTF-8 bytes. The *canonical
//! JSON* of `args` is the serde_json compact form of the parsed value with every object's keys in
//! ascending byte order (at every depth), which is:
//! - no whitespace; `null`, `true`, `false`; integers in plain decimal (`-12`, `0`,
//!   `18446744073709551615`); no floats (a fraction, an exponent or an integer beyond the
//!   64-bit range is refused on both sides);
//! - strings in `"`, escaping `"` as `\"`, `\` as `\\`, U+0008/09/0A/0C/0D as `\b \t \n \f \r`,
//!   every other character below U+0020 as `\u00xx` (lowercase hex), and everything else,
//!   including `/`, DEL and non-ASCII, as its raw UTF-8 bytes;
//! - arrays in their order.
//!
//! The keys are sorted here explicitly rather than left to serde_json: with its `preserve_order`
//! feature (which any crate in a build can switch on) its maps keep insertion order instead.
//! Floats are refused because their shortest decimal form is hard to reproduce exactly in C;
//! send integers in a smaller unit (`"temp_mc": 21500`) or strings.
//!
//! The test vector in `tests.rs` (`signing_bytes_match_the_published_test_vector`) gives a key
//! seed, the fields, the exact signing bytes and the signature, for a port to check itself.
//!
//! # What a device checks, in this order
//!
//! [`CommandVerifier::verify`] stops at the first failure and returns its [`Rejection`], whose
//! [`Rejection::code`] the device sends as the `reason` of a `rejected` ack ([`CommandAck`]):
//!
//! 1. `malformed`: longer than [`MAX_ENVELOPE_BYTES`]; not JSON; an unknown, missing, mistyped or
//!    repeated field; a key repeated inside `args`; a field breaking its rule above; `seq` 0;
//!    `expires_at < issued_at`; `expires_at - issued_at` above the device's `max_ttl_ms`
//!    (default 24 h); `sig` not strict base64 of 64 bytes.
//! 2. `wrong_thing`: `thing` is not this device's name.
//! 3. `bad_signature`: no trusted key has this `kid`, or the signature does not verify under it
//!    with Ed25519 (RFC 8032, 32-byte public keys) *strict* verification: canonical `S`, no
//!    small-order public key or `R`.
//! 4. `expired`: `now > expires_at + skew_ms`; `not_yet_valid`: `issued_at > now + skew_ms`
//!    (`skew_ms`, default 30 s, tolerates clock drift; both edges are still valid).
//! 5. Anti-replay, as in IPsec/DTLS: the device keeps the highest accepted `seq` and a 64-bit map
//!    whose bit `i` says whether `highest - i` was accepted. With `window` W (1–64, default 64):
//!    `seq > highest` is new; `seq <= highest - W` is `out_of_order` (too old to tell); otherwise
//!    the bit decides between `replayed` and accepting a command that arrived late.
//! 6. Only now is the state updated: a greater `seq` shifts the map left by `seq - highest`
//!    (clearing it for a shift of 64 or more) and sets bit 0; a late one sets its bit.
//!
//! The signature is checked before anything that depends on the clock or the state, and a
//! rejected command changes nothing. The device persists [`ReplayState`] (serde) after `verify`
//! accepts and *before* it acts, so a reboot can neither forget a seq nor replay one.

mod ack;
mod envelope;
mod record;
mod sign;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(test)]
mod tests;
mod verify;

pub use ack::{AckStatus, CommandAck};
/// A device's trusted public key.
pub use ed25519_dalek::VerifyingKey;
pub use envelope::{CommandEnvelope, Malformed, UnsignedCommand, DOMAIN, MAX_ENVELOPE_BYTES};
// What firmware manifests (`crate::ota::manifest`) share: the kid rule, the signing bytes'
// strings, the `sig` encoding and the key text.
pub(crate) use envelope::{decode_signature, put_str, KID, SIG_RULE};
pub use record::{settle, CommandRecord, CommandStatus, Settled, ACK_GRACE_MS};
pub(crate) use sign::{decode_hex, key_bytes, seed_from_text};
pub use sign::{CommandSigner, KeyError};
pub use verify::{CommandVerifier, Rejection, ReplayState, VerifierConfig, WindowOutOfRange};

/// The topic the cloud publishes `thing`'s commands on.
pub fn request_topic(thing: &str) -> String {
    format!("cmd/fleet/{thing}/req")
}

/// The topic `thing` publishes its [`CommandAck`]s on.
pub fn response_topic(thing: &str) -> String {
    format!("cmd/fleet/{thing}/res")
}
