//! `fleetctl firmware`: signing a firmware image's manifest, and checking one as a device
//! would (`fleet_shared::ota::manifest`). Files and keys only: no backend.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::Subcommand;
use fleet_shared::ota::manifest::{
    check_image, verifying_key_from_text, FirmwareManifest, ManifestSigner, ManifestVerifier,
    UnsignedManifest, MAX_IMAGE_BYTES,
};

#[derive(Subcommand)]
pub enum FirmwareCommand {
    /// Sign the manifest of a firmware image (its sha256 and size computed from the file) and
    /// print it as JSON; the key's public half goes to stderr.
    Sign {
        /// The firmware version the image is (a label, as devices report it).
        #[arg(long)]
        fw: String,
        /// The device class the image is for.
        #[arg(long)]
        class: String,
        /// Where devices download the image (https:// or http://).
        #[arg(long)]
        url: String,
        /// The image file.
        #[arg(long)]
        image: PathBuf,
        /// The signing key: a file holding the Ed25519 seed, 32 bytes in base64 or hex.
        #[arg(long)]
        key_file: PathBuf,
        /// The key's id, as devices know it.
        #[arg(long)]
        kid: String,
    },
    /// Check a manifest as a device does: well formed, signed by the trusted key, and with
    /// --image, that the image is the one it describes. Prints `ok`, or fails with the code of
    /// the first check that refused it (e.g. bad_signature, digest_mismatch).
    Verify {
        /// The manifest's JSON file.
        #[arg(long)]
        manifest: PathBuf,
        /// The trusted Ed25519 public key, 32 bytes in base64 or hex.
        #[arg(long)]
        public_key: String,
        /// The trusted key's id.
        #[arg(long)]
        kid: String,
        /// The downloaded image to check against the manifest's size and sha256.
        #[arg(long)]
        image: Option<PathBuf>,
    },
}

pub fn run(command: FirmwareCommand) -> Result<()> {
    match command {
        FirmwareCommand::Sign { fw, class, url, image, key_file, kid } => {
            let text = std::fs::read_to_string(&key_file)
                .with_context(|| format!("reading the signing key {}", key_file.display()))?;
            let signer =
                ManifestSigner::from_text(kid, &text).with_context(|| key_file.display().to_string())?;
            let unsigned = UnsignedManifest::for_image(fw, class, url, &read_image(&image)?);
            let manifest = signer.sign(unsigned).map_err(|e| refused(e.code(), e))?;
            writeln!(std::io::stdout().lock(), "{}", manifest.to_json())?;
            eprintln!(
                "signed with key {}, public key (Ed25519, base64) {}",
                signer.kid(),
                base64::engine::general_purpose::STANDARD.encode(signer.verifying_key().as_bytes())
            );
            Ok(())
        }
        FirmwareCommand::Verify { manifest, public_key, kid, image } => {
            let raw = std::fs::read(&manifest)
                .with_context(|| format!("reading the manifest {}", manifest.display()))?;
            let key = verifying_key_from_text(&public_key).context("--public-key")?;
            let manifest = FirmwareManifest::parse(&raw).map_err(|e| refused(e.code(), e))?;
            ManifestVerifier::new(vec![(kid, key)]).verify(&manifest).map_err(|e| refused(e.code(), e))?;
            if let Some(image) = image {
                check_image(&manifest, &read_image(&image)?).map_err(|e| refused(e.code(), e))?;
            }
            writeln!(std::io::stdout().lock(), "ok")?;
            Ok(())
        }
    }
}

/// A refusal as its stable code, then why: `fleetctl: digest_mismatch: the image's sha256 is ...`.
fn refused(code: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    anyhow::Error::new(e).context(code)
}

/// The image's bytes; one larger than a manifest may describe is refused before it is read.
fn read_image(path: &Path) -> Result<Vec<u8>> {
    let context = || format!("reading the image {}", path.display());
    let size = std::fs::metadata(path).with_context(context)?.len();
    if size > MAX_IMAGE_BYTES {
        bail!("{}: {size} bytes, more than the {MAX_IMAGE_BYTES} a manifest may describe", path.display());
    }
    std::fs::read(path).with_context(context)
}
