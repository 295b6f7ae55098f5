//! Every input the fuzzers kept (fuzz/corpus/<target>, minimised) replayed through its case:
//! what the fuzzers once found interesting stays covered in every CI run.

use std::collections::BTreeSet;
use std::path::Path;

fn replay<T>(target: &str, case: fn(&[u8]) -> T) -> Vec<T> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut outcomes = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        outcomes.push(case(&data));
    }
    outcomes
}

#[test]
fn the_decoder_corpus_replays_without_a_failure() {
    assert!(replay("decode", fleet_fuzz::decode_case).len() >= 30, "the corpus is kept in the repository");
}

#[test]
fn the_sqs_event_corpus_replays_without_a_failure() {
    assert!(
        replay("sqs_event", fleet_fuzz::sqs_event_case).len() >= 9,
        "the corpus is kept in the repository"
    );
}

#[test]
fn the_certificate_corpus_replays_without_a_failure_and_holds_real_certificates() {
    let outcomes = replay("cert_pem", fleet_fuzz::cert_pem_case);
    let certificates = outcomes.iter().filter(|o| o.is_ok()).count();
    assert!(outcomes.len() >= 30, "the corpus is kept in the repository");
    assert!(certificates >= 5, "only {certificates} of {} inputs are certificates", outcomes.len());
}

#[test]
fn the_hook_request_corpus_replays_without_a_failure_and_reaches_every_store_free_verdict() {
    let verdicts: BTreeSet<_> = replay("hook_request", fleet_fuzz::hook_request_case).into_iter().collect();
    for verdict in [
        None,
        Some("malformed_event"),
        Some("bad_serial"),
        Some("bad_certificate"),
        Some("certificate_mismatch"),
        Some("certificate_not_valid_now"),
    ] {
        assert!(verdicts.contains(&verdict), "no input reaches {verdict:?}: {verdicts:?}");
    }
}

#[test]
fn the_provisioning_hook_events_seeding_the_corpus_reach_their_verdicts() {
    let verdict = |event: &str| fleet_fuzz::hook_request_case(event.as_bytes());
    assert_eq!(verdict(include_str!("../../events/provisioning-hook/allowed-serial.json")), None);
    assert_eq!(
        verdict(include_str!("../../events/provisioning-hook/unknown-serial.json")),
        None,
        "only the allowlist knows the serial"
    );
    assert_eq!(
        verdict(include_str!("../../events/provisioning-hook/certificate-mismatch.json")),
        Some("certificate_mismatch")
    );
    assert_eq!(
        verdict(include_str!("../../events/provisioning-hook/malformed.json")),
        Some("malformed_event")
    );
}
