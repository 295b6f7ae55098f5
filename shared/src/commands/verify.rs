//! The device's side: the checks of the module doc, in that order, and the anti-replay state.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{CommandEnvelope, Malformed};

/// Why a device refuses a command; [`Rejection::code`] goes into the `rejected` ack.
#[derive(Debug, Error)]
pub enum Rejection {
    #[error("malformed command: {0}")]
    Malformed(#[from] Malformed),
    #[error("command is for thing `{0}`")]
    WrongThing(String),
    #[error("no trusted key `{kid}` verifies the signature")]
    BadSignature { kid: String },
    #[error("command expired at {expires_at}, now is {now_ms}")]
    Expired { expires_at: i64, now_ms: i64 },
    #[error("command issued at {issued_at}, later than now ({now_ms})")]
    NotYetValid { issued_at: i64, now_ms: i64 },
    #[error("seq {0} was already accepted")]
    Replayed(u64),
    #[error("seq {seq} is below the anti-replay window under seq {highest}")]
    OutOfOrder { seq: u64, highest: u64 },
}

impl Rejection {
    /// The stable reason code a device reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::WrongThing(_) => "wrong_thing",
            Self::BadSignature { .. } => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Replayed(_) => "replayed",
            Self::OutOfOrder { .. } => "out_of_order",
        }
    }
}

/// What a device is and whom it trusts.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// This device's thing name.
    pub thing: String,
    /// `(kid, key)` pairs; two during a key rotation.
    pub trusted: Vec<(String, VerifyingKey)>,
    /// Clock-skew tolerance on both `issued_at` and `expires_at`.
    pub skew_ms: u32,
    /// How many seqs up to the highest accepted one may still arrive late: 1..=[`Self::MAX_WINDOW`].
    pub window: u8,
    /// The longest `expires_at - issued_at` accepted.
    pub max_ttl_ms: u32,
}

impl VerifierConfig {
    pub const DEFAULT_SKEW_MS: u32 = 30_000;
    pub const MAX_WINDOW: u8 = 64;
    pub const DEFAULT_MAX_TTL_MS: u32 = 24 * 60 * 60 * 1000;

    /// The defaults: 30 s of skew, a 64-seq window, lifetimes up to 24 h.
    pub fn new(thing: impl Into<String>, trusted: Vec<(String, VerifyingKey)>) -> Self {
        Self {
            thing: thing.into(),
            trusted,
            skew_ms: Self::DEFAULT_SKEW_MS,
            window: Self::MAX_WINDOW,
            max_ttl_ms: Self::DEFAULT_MAX_TTL_MS,
        }
    }
}

#[derive(Debug, Error)]
#[error("the anti-replay window must be 1 to 64 seqs, not {0}")]
pub struct WindowOutOfRange(pub u8);

/// The anti-replay state a device persists: the highest accepted seq and a map whose bit `i`
/// is set when seq `highest - i` was accepted. The default is a device that accepted nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayState {
    highest: u64,
    seen: u64,
}

impl ReplayState {
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Steps 5 and 6 of the module doc: accepts `seq` if the window allows it.
    fn admit(&mut self, seq: u64, window: u8) -> Result<(), Rejection> {
        match self.highest.checked_sub(seq) {
            None => {
                // Above everything accepted so far: slide the window up to `seq`.
                let shift = u32::try_from(seq - self.highest).ok();
                self.seen = shift.and_then(|s| self.seen.checked_shl(s)).unwrap_or(0) | 1;
                self.highest = seq;
            }
            Some(age) if age >= u64::from(window) => {
                return Err(Rejection::OutOfOrder { seq, highest: self.highest })
            }
            Some(age) if (self.seen >> age) & 1 == 1 => return Err(Rejection::Replayed(seq)),
            Some(age) => self.seen |= 1 << age,
        }
        Ok(())
    }
}

/// Checks commands for one device and remembers which seqs it accepted.
#[derive(Debug, Clone)]
pub struct CommandVerifier {
    config: VerifierConfig,
    state: ReplayState,
}

impl CommandVerifier {
    /// A verifier resuming from `state` (`ReplayState::default()` on first boot).
    pub fn new(config: VerifierConfig, state: ReplayState) -> Result<Self, WindowOutOfRange> {
        if !(1..=VerifierConfig::MAX_WINDOW).contains(&config.window) {
            return Err(WindowOutOfRange(config.window));
        }
        Ok(Self { config, state })
    }

    /// The state to persist after an accepted command, before acting on it.
    pub fn state(&self) -> ReplayState {
        self.state
    }

    /// Runs every check of the module doc on `raw` at `now_ms` (Unix ms); only a command that
    /// passes them all is returned and recorded as accepted.
    pub fn verify(&mut self, raw: &[u8], now_ms: i64) -> Result<CommandEnvelope, Rejection> {
        let cmd = CommandEnvelope::parse(raw)?;
        let sig = cmd.signature()?;
        let ttl_ms = cmd.expires_at.abs_diff(cmd.issued_at); // parse checked expires_at >= issued_at
        if ttl_ms > u64::from(self.config.max_ttl_ms) {
            return Err(Malformed::TooLongLived { ttl_ms, max_ttl_ms: self.config.max_ttl_ms }.into());
        }
        if cmd.thing != self.config.thing {
            return Err(Rejection::WrongThing(cmd.thing));
        }
        let key = self.config.trusted.iter().find(|(kid, _)| *kid == cmd.kid).map(|(_, key)| key);
        let verified = key.is_some_and(|key| key.verify_strict(&cmd.signing_bytes(), &sig).is_ok());
        if !verified {
            return Err(Rejection::BadSignature { kid: cmd.kid });
        }
        let skew = i64::from(self.config.skew_ms);
        if now_ms > cmd.expires_at.saturating_add(skew) {
            return Err(Rejection::Expired { expires_at: cmd.expires_at, now_ms });
        }
        if cmd.issued_at > now_ms.saturating_add(skew) {
            return Err(Rejection::NotYetValid { issued_at: cmd.issued_at, now_ms });
        }
        self.state.admit(cmd.seq, self.config.window)?;
        Ok(cmd)
    }
}
