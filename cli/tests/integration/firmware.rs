//! `fleetctl firmware sign` and `verify` on files: the manifest the first prints is accepted by
//! the second with the image it was made from, and refused with another.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use serde_json::Value;

use crate::support::FLEETCTL;
/// The key seed 00 01 .. 1f in hex; its public key, in base64.
const SEED_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const PUBLIC_BASE64: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";

fn fleetctl(args: &[&str], dir: &Path) -> Result<Output> {
    Ok(Command::new(FLEETCTL).args(args).current_dir(dir).output()?)
}

fn verify(dir: &Path, image: &str) -> Result<Output> {
    let args = [
        "firmware",
        "verify",
        "--manifest",
        "manifest.json",
        "--public-key",
        PUBLIC_BASE64,
        "--kid",
        "fw2026",
    ];
    fleetctl(&[&args[..], &["--image", image]].concat(), dir)
}

#[test]
fn a_signed_manifest_verifies_with_its_image_and_is_refused_with_a_tampered_one() -> Result<()> {
    // GIVEN a firmware image and a signing key in files
    let dir = tempfile::tempdir()?;
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("sensor-1.5.0.bin"), &image)?;
    std::fs::write(dir.path().join("fw.key"), format!("{SEED_HEX}\n"))?;

    // WHEN the image's manifest is signed
    let url = "https://firmware.example.com/sensor/1.5.0.bin";
    let signed = fleetctl(
        &[
            "firmware",
            "sign",
            "--fw",
            "1.5.0",
            "--class",
            "sensor",
            "--url",
            url,
            "--image",
            "sensor-1.5.0.bin",
            "--key-file",
            "fw.key",
            "--kid",
            "fw2026",
        ],
        dir.path(),
    )?;

    // THEN stdout is the manifest, with the image's size and sha256, and stderr the public key
    ensure!(signed.status.success(), "sign failed: {}", String::from_utf8_lossy(&signed.stderr));
    let manifest: Value = serde_json::from_slice(&signed.stdout)?;
    ensure!(
        manifest["fw"] == "1.5.0" && manifest["class"] == "sensor" && manifest["url"] == url,
        "{manifest}"
    );
    ensure!(manifest["size"] == 100_000 && manifest["kid"] == "fw2026", "{manifest}");
    let sha256 = manifest["sha256"].as_str().unwrap_or_default();
    ensure!(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()), "{manifest}");
    ensure!(String::from_utf8_lossy(&signed.stderr).contains(PUBLIC_BASE64), "{signed:?}");
    std::fs::write(dir.path().join("manifest.json"), &signed.stdout)?;

    // WHEN it is verified with the image, with one bit of the image flipped, with the image
    // cut short, and against another key's id
    let mut tampered = image.clone();
    tampered[50_000] ^= 0x01;
    std::fs::write(dir.path().join("tampered.bin"), &tampered)?;
    std::fs::write(dir.path().join("short.bin"), &image[..99_999])?;
    let good = verify(dir.path(), "sensor-1.5.0.bin")?;
    let flipped = verify(dir.path(), "tampered.bin")?;
    let short = verify(dir.path(), "short.bin")?;
    let other_kid = fleetctl(
        &[
            "firmware",
            "verify",
            "--manifest",
            "manifest.json",
            "--public-key",
            PUBLIC_BASE64,
            "--kid",
            "fw2027",
        ],
        dir.path(),
    )?;

    // THEN the first prints ok, and each other one fails naming its code
    ensure!(good.status.success() && good.stdout == b"ok\n", "{good:?}");
    for (outcome, code) in
        [(&flipped, "digest_mismatch"), (&short, "size_mismatch"), (&other_kid, "unknown_kid")]
    {
        let stderr = String::from_utf8_lossy(&outcome.stderr);
        ensure!(!outcome.status.success() && outcome.stdout.is_empty(), "{code}: {outcome:?}");
        ensure!(stderr.starts_with(&format!("fleetctl: {code}: ")), "{code}: {stderr}");
    }
    Ok(())
}

#[test]
fn a_manifest_edited_after_signing_is_refused_for_its_signature() -> Result<()> {
    // GIVEN a signed manifest whose url was then pointed elsewhere
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("image.bin"), b"firmware")?;
    std::fs::write(dir.path().join("fw.key"), SEED_HEX)?;
    let signed = fleetctl(
        &[
            "firmware",
            "sign",
            "--fw",
            "1.5.0",
            "--class",
            "sensor",
            "--url",
            "https://firmware.example.com/a.bin",
            "--image",
            "image.bin",
            "--key-file",
            "fw.key",
            "--kid",
            "fw2026",
        ],
        dir.path(),
    )?;
    ensure!(signed.status.success(), "sign failed: {}", String::from_utf8_lossy(&signed.stderr));
    let edited = String::from_utf8(signed.stdout)?.replace("example.com/a.bin", "example.net/a.bin");
    std::fs::write(dir.path().join("manifest.json"), edited)?;

    // WHEN it is verified with its own image
    let outcome = verify(dir.path(), "image.bin")?;

    // THEN it is refused for its signature
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    ensure!(!outcome.status.success() && stderr.starts_with("fleetctl: bad_signature: "), "{stderr}");
    Ok(())
}
