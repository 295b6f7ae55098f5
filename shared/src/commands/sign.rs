//! The cloud's side: an Ed25519 key with its key id, turning commands into signed envelopes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use thiserror::Error;

use super::envelope::KID;
use super::{CommandEnvelope, Malformed, UnsignedCommand, MAX_ENVELOPE_BYTES};

/// Why a signing key could not be loaded.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("invalid key id: {0}")]
    Kid(#[from] Malformed),
    #[error("signing key text is neither hex nor standard base64: {0}")]
    Encoding(#[from] base64::DecodeError),
    #[error("an Ed25519 signing key is a 32-byte seed, this text holds {0} bytes")]
    WrongLength(usize),
}

/// Signs commands with one key; `kid` names it to devices (module doc).
#[derive(Debug)]
pub struct CommandSigner {
    kid: String,
    key: SigningKey,
}

impl CommandSigner {
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

    /// Checks `command` against the envelope rules and signs it under this key.
    pub fn sign(&self, command: UnsignedCommand) -> Result<CommandEnvelope, Malformed> {
        let mut envelope = self.unsigned(command);
        envelope.check()?;
        envelope.sig = STANDARD.encode(self.key.sign(&envelope.signing_bytes()).to_bytes());
        let bytes = envelope.to_json().len();
        if bytes > MAX_ENVELOPE_BYTES {
            return Err(Malformed::TooLarge { bytes });
        }
        Ok(envelope)
    }

    /// Whether [`Self::sign`] would take `command` (every envelope rule, the size with its
    /// signature), without signing: a dispatcher checks before it spends a sequence number.
    pub fn check(&self, command: &UnsignedCommand) -> Result<(), Malformed> {
        let envelope = self.unsigned(command.clone());
        envelope.check()?;
        // The signature is 88 characters of base64 where the empty `sig` is now.
        let bytes = envelope.to_json().len() + 88;
        if bytes > MAX_ENVELOPE_BYTES {
            return Err(Malformed::TooLarge { bytes });
        }
        Ok(())
    }

    fn unsigned(&self, command: UnsignedCommand) -> CommandEnvelope {
        let UnsignedCommand { cmd_id, thing, seq, issued_at, expires_at, name, args } = command;
        CommandEnvelope {
            cmd_id,
            thing,
            seq,
            issued_at,
            expires_at,
            name,
            args,
            kid: self.kid.clone(),
            sig: String::new(),
        }
    }
}

/// A signing key's 32-byte seed from its text ([`key_bytes`]).
pub(crate) fn seed_from_text(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = key_bytes(text)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::WrongLength(bytes.len()))
}

/// The bytes of a key written as hex digits or standard base64 (as key files and operators
/// hold keys); surrounding whitespace is ignored.
pub(crate) fn key_bytes(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let text = text.trim();
    match decode_hex(text) {
        Some(bytes) => Ok(bytes),
        None => STANDARD.decode(text),
    }
}

/// `Some` when `text` is hex digits only (any case), in pairs.
pub(crate) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes().chunks_exact(2).map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?)).collect()
}
