//! Every input the fuzzers kept (fuzz/corpus/<target>, minimised) replayed through its case:
//! what the fuzzers once found interesting stays covered in every CI run.

use std::path::Path;

fn replay(target: &str, case: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        case(&data);
        n += 1;
    }
    n
}

#[test]
fn the_decoder_corpus_replays_without_a_failure() {
    assert!(replay("decode", fleet_fuzz::decode_case) >= 30, "the corpus is kept in the repository");
}

#[test]
fn the_sqs_event_corpus_replays_without_a_failure() {
    assert!(replay("sqs_event", fleet_fuzz::sqs_event_case) >= 9, "the corpus is kept in the repository");
}
