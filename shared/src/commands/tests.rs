use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const THING: &str = "sensor-42";
const T0: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;
const MAX_TTL: i64 = VerifierConfig::DEFAULT_MAX_TTL_MS as i64;

fn signer(seed: u8, kid: &str) -> Result<CommandSigner, KeyError> {
    CommandSigner::from_bytes(kid, &[seed; 32])
}

fn object(value: Value) -> Result<Map<String, Value>, serde_json::Error> {
    serde_json::from_value(value)
}

fn command(seq: u64, issued_at: i64, ttl_ms: i64) -> Result<UnsignedCommand, serde_json::Error> {
    Ok(UnsignedCommand {
        cmd_id: format!("c-{seq}"),
        thing: THING.into(),
        seq,
        issued_at,
        expires_at: issued_at + ttl_ms,
        name: "valve.set".into(),
        args: object(json!({"zone": "b", "level": 3, "tags": ["x", -1, null]}))?,
    })
}

fn config(trusted: &[&CommandSigner]) -> VerifierConfig {
    VerifierConfig::new(THING, trusted.iter().map(|s| (s.kid().to_owned(), s.verifying_key())).collect())
}

fn device(trusted: &[&CommandSigner]) -> Result<CommandVerifier, WindowOutOfRange> {
    CommandVerifier::new(config(trusted), ReplayState::default())
}

fn wire(envelope: &CommandEnvelope) -> Vec<u8> {
    envelope.to_json().into_bytes()
}

/// The envelope as a JSON object, to be changed in ways the types would not allow.
fn fields(envelope: &CommandEnvelope) -> Result<Map<String, Value>, serde_json::Error> {
    object(serde_json::to_value(envelope)?)
}

fn code(outcome: &Result<CommandEnvelope, Rejection>) -> Option<&'static str> {
    outcome.as_ref().err().map(Rejection::code)
}

#[test]
fn accepts_a_signed_command_and_returns_it_as_sent() -> TestResult {
    // GIVEN a device trusting the cloud's key and a command signed with it
    let cloud = signer(1, "k1")?;
    let mut device = device(&[&cloud])?;
    let sent = cloud.sign(command(1, T0, HOUR)?)?;

    // WHEN the device verifies the published bytes
    let got = device.verify(&wire(&sent), T0)?;

    // THEN it gets the same command and records seq 1
    assert_eq!(got, sent);
    assert_eq!(device.state().highest(), 1);
    Ok(())
}

#[test]
fn signing_bytes_match_the_published_test_vector() -> TestResult {
    // GIVEN the key seed 00 01 .. 1f and fixed fields, args keys out of order and a string
    // that needs escapes
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let cloud = CommandSigner::from_bytes("k2024", &seed)?;
    let unsigned = UnsignedCommand {
        cmd_id: "c-0001".into(),
        thing: THING.into(),
        seq: 7,
        issued_at: 1_700_000_000_000,
        expires_at: 1_700_000_060_000,
        name: "valve.set".into(),
        args: object(
            json!({"zone": "b", "open": true, "level": -3, "note": "Zoë\t\"1\"/", "tags": ["x", null]}),
        )?,
    };

    // WHEN it is signed
    let signed = cloud.sign(unsigned)?;

    // THEN the signing bytes, the public key and the signature are exactly these (as Python's
    // json.dumps(sort_keys=True) with OpenSSL's Ed25519 also gives them), and the device accepts it
    let hex: String = signed.signing_bytes().iter().map(|b| format!("{b:02x}")).collect();
    println!("signing bytes: {hex}\nsig: {}", signed.sig);
    let expected = concat!(
        "666c6565746c696e652d636d642d763100", // "fleetline-cmd-v1\0"
        "00000006",
        "632d30303031", // cmd_id "c-0001"
        "00000009",
        "73656e736f722d3432", // thing "sensor-42"
        "0000000000000007",   // seq 7
        "0000018bcfe56800",   // issued_at 1700000000000
        "0000018bcfe65260",   // expires_at 1700000060000
        "00000009",
        "76616c76652e736574", // name "valve.set"
        "0000004b", // args, 75 bytes: {"level":-3,"note":"Zoë\t\"1\"/","open":true,"tags":["x",null],"zone":"b"}
        "7b226c6576656c223a2d332c226e6f7465223a225a6fc3ab5c745c22315c222f222c226f70656e223a747275652c",
        "2274616773223a5b2278222c6e756c6c5d2c227a6f6e65223a2262227d",
        "00000005",
        "6b32303234", // kid "k2024"
    );
    assert_eq!(hex, expected);
    let public: String = cloud.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(public, "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8");
    assert_eq!(
        signed.sig,
        "8Yrl9leVdsoVtGvTvL/Zu1pdXysNusopDeEqmB4a5vmmS9z1IAhbEidaHI9rAeIwd2O9DlB5SFjb/ER54pjQAA=="
    );
    let mut device = CommandVerifier::new(
        VerifierConfig::new(THING, vec![("k2024".into(), cloud.verifying_key())]),
        ReplayState::default(),
    )?;
    assert_eq!(device.verify(&wire(&signed), signed.issued_at)?, signed);
    Ok(())
}

#[test]
fn canonical_args_sort_keys_at_every_depth_whatever_the_insertion_order() -> TestResult {
    // GIVEN the same args built in two different key orders
    let mut inner = Map::new();
    inner.insert("y".into(), json!([{"z": 2, "k": 1}]));
    inner.insert("x".into(), json!(true));
    let mut forward = Map::new();
    forward.insert("z".into(), Value::Null);
    forward.insert("m".into(), Value::Object(inner));
    forward.insert("a".into(), json!(1));
    let backward: Map<String, Value> = forward.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
    let cloud = signer(1, "k1")?;
    let mut a = command(1, T0, HOUR)?;
    a.args = forward;
    let mut b = a.clone();
    b.args = backward;

    // WHEN both are signed
    let (a, b) = (cloud.sign(a)?, cloud.sign(b)?);

    // THEN the signing bytes hold the sorted form and agree
    let canonical = br#"{"a":1,"m":{"x":true,"y":[{"k":1,"z":2}]},"z":null}"#;
    assert!(a.signing_bytes().windows(canonical.len()).any(|w| w == canonical));
    assert_eq!(a.signing_bytes(), b.signing_bytes());
    assert_eq!(a.sig, b.sig);
    Ok(())
}

#[test]
fn rejects_every_single_byte_flip_of_a_signed_envelope() -> TestResult {
    // GIVEN a signed envelope that verifies as published
    let cloud = signer(1, "k1")?;
    let mut args = command(5, T0, HOUR)?;
    args.args = object(json!({"mode": "eco", "limits": {"lo": 2, "hi": [10, 20]}, "on": false}))?;
    let original = wire(&cloud.sign(args)?);
    let fresh = device(&[&cloud])?;
    fresh.clone().verify(&original, T0)?;

    // WHEN every byte is flipped in its lowest and in its highest bit, one at a time
    let mut accepted = Vec::new();
    let mut tried = 0;
    for position in 0..original.len() {
        for mask in [0x01, 0x80] {
            let mut variant = original.clone();
            variant[position] ^= mask;
            tried += 1;
            if fresh.clone().verify(&variant, T0).is_ok() {
                accepted.push((position, mask));
            }
        }
    }

    // THEN no variant verifies
    assert_eq!(tried, 2 * original.len());
    assert_eq!(accepted, []);
    Ok(())
}

#[test]
fn rejects_a_command_for_another_thing_even_when_its_thing_is_rewritten() -> TestResult {
    // GIVEN a command signed for sensor-43, sent to sensor-42
    let cloud = signer(1, "k1")?;
    let mut device = device(&[&cloud])?;
    let mut other = command(1, T0, HOUR)?;
    other.thing = "sensor-43".into();
    let signed = cloud.sign(other)?;

    // WHEN it arrives as is, and with its thing rewritten to this device
    let as_is = device.verify(&wire(&signed), T0);
    let rewritten = device.verify(&wire(&CommandEnvelope { thing: THING.into(), ..signed }), T0);

    // THEN the first is for the wrong thing and the second fails its signature
    assert_eq!(code(&as_is), Some("wrong_thing"));
    assert_eq!(code(&rewritten), Some("bad_signature"));
    assert_eq!(device.state(), ReplayState::default());
    Ok(())
}

#[test]
fn rejects_repeated_fields_and_repeated_args_keys_as_malformed() -> TestResult {
    // GIVEN a valid envelope's JSON with `seq` given twice, and args whose keys repeat, once
    // spelled with an escape and once inside a nested object
    let cloud = signer(1, "k1")?;
    let json = cloud.sign(command(1, T0, HOUR)?)?.to_json();
    let twice_seq = json.replacen("\"seq\":1,", "\"seq\":1,\"seq\":2,", 1);
    let args_at = json.find("\"args\":{").ok_or("no args")? + "\"args\":{".len();
    let variants =
        [r#""a":1,"a":1,"#, r#""a":1,"\u0061":2,"#, r#""n":{"b":[{"c":1,"c":2}]},"#].map(|prefix| {
            let mut v = json.clone();
            v.insert_str(args_at, prefix);
            v
        });

    // WHEN they are verified
    let mut device = device(&[&cloud])?;
    let seq_outcome = device.verify(twice_seq.as_bytes(), T0);
    let args_outcomes: Vec<_> = variants.iter().map(|v| device.verify(v.as_bytes(), T0)).collect();

    // THEN each is malformed, saying which field or key repeats
    assert!(
        matches!(&seq_outcome, Err(e) if e.to_string().contains("duplicate field `seq`")),
        "{seq_outcome:?}"
    );
    for outcome in &args_outcomes {
        assert!(matches!(outcome, Err(e) if e.to_string().contains("appears twice")), "{outcome:?}");
    }
    Ok(())
}

#[test]
fn rejects_envelopes_that_break_a_field_rule_as_malformed() -> TestResult {
    // GIVEN a valid envelope changed in one way each
    let cloud = signer(1, "k1")?;
    let signed = cloud.sign(command(1, T0, HOUR)?)?;
    let base = fields(&signed)?;
    let changes: [(&str, Value); 12] = [
        ("extra", json!(1)),
        ("args", json!([1])),
        ("args", json!({"t": 21.5})),
        ("args", json!({"t": [1e3]})),
        ("seq", json!(0)),
        ("seq", json!(-1)),
        ("cmd_id", json!("c 1")),
        ("name", json!("")),
        ("kid", json!("k".repeat(33))),
        ("expires_at", json!(T0 - 1)),
        ("expires_at", json!(T0 + MAX_TTL + 1)),
        ("sig", json!(signed.sig.trim_end_matches('='))),
    ];
    let mut raws: Vec<Vec<u8>> = changes
        .into_iter()
        .map(|(field, value)| {
            let mut changed = base.clone();
            changed.insert(field.into(), value);
            serde_json::to_vec(&changed)
        })
        .collect::<Result<_, _>>()?;
    let mut missing = base.clone();
    missing.remove("issued_at");
    raws.push(serde_json::to_vec(&missing)?);
    raws.push(b"not json".to_vec());
    raws.push(
        signed.to_json().replacen(r#""args":{"#, r#""args":{"big":18446744073709551616,"#, 1).into_bytes(),
    );
    raws.push(format!("{} ", signed.to_json()).repeat(MAX_ENVELOPE_BYTES / 100).into_bytes());

    // WHEN each is verified
    let mut device = device(&[&cloud])?;
    let codes: Vec<_> = raws.iter().map(|raw| code(&device.verify(raw, T0))).collect();

    // THEN every one is malformed and nothing was accepted
    assert_eq!(codes, vec![Some("malformed"); raws.len()]);
    assert_eq!(device.state(), ReplayState::default());
    Ok(())
}

#[test]
fn replay_state_survives_a_reboot() -> TestResult {
    // GIVEN a device that accepted seqs 1-5 and 8, and persisted its state as JSON
    let cloud = signer(1, "k1")?;
    let mut before = device(&[&cloud])?;
    let signed: Vec<_> = (1..=8).map(|seq| cloud.sign(command(seq, T0, HOUR)?)).collect::<Result<_, _>>()?;
    for seq in [1, 2, 3, 4, 5, 8] {
        before.verify(&wire(&signed[seq - 1]), T0)?;
    }
    let persisted = serde_json::to_string(&before.state())?;

    // WHEN it reboots from that state and receives 5, 6 and 8
    let mut after = CommandVerifier::new(config(&[&cloud]), serde_json::from_str(&persisted)?)?;
    let outcomes = [5, 6, 8].map(|seq| code(&after.verify(&wire(&signed[seq - 1]), T0)));

    // THEN 5 and 8 are replays and the late 6 is accepted
    assert_eq!(outcomes, [Some("replayed"), None, Some("replayed")]);
    assert_eq!(after.state().highest(), 8);
    Ok(())
}

#[test]
fn window_edges_decide_between_late_and_out_of_order() -> TestResult {
    // GIVEN a device with a window of 4 that accepted seq 10, and one with the full window
    // that accepted seq 1 and then jumped to 100
    let cloud = signer(1, "k1")?;
    let raw = |seq| cloud.sign(command(seq, T0, HOUR)?).map(|e| wire(&e));
    let mut narrow =
        CommandVerifier::new(VerifierConfig { window: 4, ..config(&[&cloud]) }, ReplayState::default())?;
    narrow.verify(&raw(10)?, T0)?;
    let mut wide = device(&[&cloud])?;
    wide.verify(&raw(1)?, T0)?;
    wide.verify(&raw(100)?, T0)?;

    // WHEN seqs arrive just inside and just outside each window
    let narrow_codes = [7, 6].map(|seq| raw(seq).map(|r| code(&narrow.verify(&r, T0))));
    let wide_codes = [37, 36, 1].map(|seq| raw(seq).map(|r| code(&wide.verify(&r, T0))));

    // THEN highest - (window - 1) is accepted late and highest - window is out of order
    assert_eq!(narrow_codes.map(Result::ok), [Some(None), Some(Some("out_of_order"))]);
    assert_eq!(
        wide_codes.map(Result::ok),
        [Some(None), Some(Some("out_of_order")), Some(Some("out_of_order"))]
    );
    Ok(())
}

#[test]
fn checks_the_signature_before_the_clock_and_the_replay_state() -> TestResult {
    // GIVEN a device that accepted seq 1, and an impostor using the trusted kid
    let cloud = signer(1, "k1")?;
    let impostor = signer(9, "k1")?;
    let mut device = device(&[&cloud])?;
    device.verify(&wire(&cloud.sign(command(1, T0, HOUR)?)?), T0)?;
    let state = device.state();

    // WHEN the impostor sends a replay of seq 1, an expired and a not yet valid command
    let codes = [
        code(&device.verify(&wire(&impostor.sign(command(1, T0, HOUR)?)?), T0)),
        code(&device.verify(&wire(&impostor.sign(command(2, T0, HOUR)?)?), T0 + 2 * HOUR)),
        code(&device.verify(&wire(&impostor.sign(command(3, T0 + HOUR, HOUR)?)?), T0)),
    ];

    // THEN each fails on its signature and the state is untouched
    assert_eq!(codes, [Some("bad_signature"); 3]);
    assert_eq!(device.state(), state);
    Ok(())
}

#[test]
fn rejects_replay_state_with_unknown_fields() {
    // GIVEN persisted state with a field this version does not know
    let persisted = r#"{"highest":3,"seen":7,"window":64}"#;

    // WHEN it is read
    let read = serde_json::from_str::<ReplayState>(persisted);

    // THEN it is refused rather than half-read
    assert!(read.is_err());
}

#[test]
fn loads_the_same_key_from_hex_or_base64_and_names_a_wrong_length() -> TestResult {
    // GIVEN one seed written as hex, as base64 with a trailing newline, and a 64-byte keypair
    let hex = "ab".repeat(32);
    let base64 = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n";
    let keypair = "ab".repeat(64);

    // WHEN signers are loaded from them
    let from_hex = CommandSigner::from_text("k1", &hex)?;
    let from_base64 = CommandSigner::from_text("k1", base64)?;
    let wrong = CommandSigner::from_text("k1", &keypair);
    let garbage = CommandSigner::from_text("k1", "not a key!");
    let bad_kid = CommandSigner::from_text("k 1", &hex);

    // THEN the first two are the same key and the others say what is wrong
    assert_eq!(from_hex.verifying_key(), from_base64.verifying_key());
    assert_eq!(from_hex.verifying_key(), signer(0xab, "k1")?.verifying_key());
    assert!(matches!(wrong, Err(KeyError::WrongLength(64))), "{wrong:?}");
    assert!(matches!(garbage, Err(KeyError::Encoding(_))), "{garbage:?}");
    assert!(matches!(bad_kid, Err(KeyError::Kid(_))), "{bad_kid:?}");
    Ok(())
}

#[test]
fn signer_refuses_commands_devices_would_reject_as_malformed() -> TestResult {
    // GIVEN commands breaking one rule each
    let cloud = signer(1, "k1")?;
    let valid = command(1, T0, HOUR)?;
    let broken = [
        UnsignedCommand { cmd_id: "c/1".into(), ..valid.clone() },
        UnsignedCommand { thing: String::new(), ..valid.clone() },
        UnsignedCommand { seq: 0, ..valid.clone() },
        UnsignedCommand { expires_at: T0 - 1, ..valid.clone() },
        UnsignedCommand { args: object(json!({"t": 0.5}))?, ..valid.clone() },
        UnsignedCommand { args: object(json!({"blob": "x".repeat(MAX_ENVELOPE_BYTES)}))?, ..valid },
    ];

    // WHEN the cloud signs them
    let signed: Vec<_> = broken.into_iter().map(|c| cloud.sign(c)).collect();

    // THEN none is signed
    assert!(signed.iter().all(Result::is_err), "{signed:?}");
    Ok(())
}

#[test]
fn refuses_an_anti_replay_window_outside_1_to_64() -> TestResult {
    // GIVEN configs with windows 0, 1, 64 and 65
    let cloud = signer(1, "k1")?;
    let with_window =
        |window| CommandVerifier::new(VerifierConfig { window, ..config(&[&cloud]) }, ReplayState::default());

    // WHEN verifiers are built from them
    let built = [0, 1, 64, 65].map(|w| with_window(w).is_ok());

    // THEN only 1 and 64 are allowed
    assert_eq!(built, [false, true, true, false]);
    Ok(())
}

#[test]
fn rejected_ack_echoes_the_claimed_cmd_id_with_the_reason_code() -> TestResult {
    // GIVEN a command the device already accepted, and bytes that are not a command
    let cloud = signer(1, "k1")?;
    let mut device = device(&[&cloud])?;
    let raw = wire(&cloud.sign(command(1, T0, HOUR)?)?);
    device.verify(&raw, T0)?;
    let replay = device.verify(&raw, T0).err().ok_or("replay accepted")?;

    // WHEN the device builds its rejected acks
    let ack = CommandAck::rejected(&raw, &replay).ok_or("no ack")?;
    let none = CommandAck::rejected(b"\x00garbage", &replay);

    // THEN the command's ack names it and the reason, and garbage gets no ack
    assert_eq!(ack.to_json(), r#"{"cmd_id":"c-1","status":"rejected","reason":"replayed"}"#);
    assert_eq!(none, None);
    Ok(())
}

#[test]
fn parses_acks_strictly() -> TestResult {
    // GIVEN a valid succeeded ack and invalid ones
    let good = br#"{"cmd_id":"c-1","status":"succeeded","result":{"level":3}}"#;
    let bad: [&[u8]; 6] = [
        br#"{"cmd_id":"c-1","status":"Succeeded"}"#,
        br#"{"cmd_id":"c-1","status":"rejected"}"#,
        br#"{"cmd_id":"c-1","status":"failed","extra":1}"#,
        br#"{"cmd_id":"c-1","status":"failed","status":"failed"}"#,
        br#"{"cmd_id":"c-1","status":"succeeded","result":{"a":1,"a":2}}"#,
        br#"{"cmd_id":"","status":"failed"}"#,
    ];

    // WHEN they are parsed
    let parsed = CommandAck::parse(good)?;
    let refused = bad.iter().filter(|raw| CommandAck::parse(raw).is_err()).count();

    // THEN the good one reads back to itself and every bad one is refused
    assert_eq!(parsed.status, AckStatus::Succeeded);
    assert_eq!(parsed.result, Some(object(json!({"level": 3}))?));
    assert_eq!(CommandAck::parse(parsed.to_json().as_bytes())?, parsed);
    assert_eq!(refused, bad.len());
    Ok(())
}

#[test]
fn topics_are_cmd_fleet_thing_req_and_res() {
    // GIVEN / WHEN the topics of sensor-42
    let topics = (request_topic(THING), response_topic(THING));

    // THEN they follow cmd/fleet/<thing>/req|res
    assert_eq!(topics, ("cmd/fleet/sensor-42/req".to_owned(), "cmd/fleet/sensor-42/res".to_owned()));
}

// Generated sets: every valid command accepted, every class of bad one rejected with its code.
// Few cases: each one signs and verifies dozens of commands in an unoptimized build.

/// Seqs with gaps, shuffled within blocks of `window` so each arrives late by less than it.
fn arrivals(window: u8, gaps_and_keys: &[(u64, u32)]) -> Vec<u64> {
    let mut seq = 0;
    let mut order: Vec<(u64, u32, u64)> = gaps_and_keys
        .iter()
        .map(|&(gap, key)| {
            seq += gap;
            ((seq - 1) / u64::from(window), key, seq)
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, _, seq)| seq).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn accepts_every_valid_command_including_late_ones_and_skew_edges(
        window in 1..=64u8,
        skew in 0..=60_000u32,
        gaps_and_keys in prop::collection::vec((1..=3u64, any::<u32>()), 1..48),
        timing in prop::collection::vec((0..1_000_000_000i64, 0..=MAX_TTL, 0..3u8, any::<u64>(), any::<bool>()), 48),
    ) {
        // GIVEN a device in the middle of a key rotation, with a random window and skew
        let (old, new) = (signer(1, "k-old")?, signer(2, "k-new")?);
        let config = VerifierConfig { window, skew_ms: skew, ..config(&[&old, &new]) };
        let mut device = CommandVerifier::new(config, ReplayState::default())?;
        let skew = i64::from(skew);

        // WHEN valid commands arrive late within the window, at random times within their
        // validity including both skew edges, signed by either trusted key
        let seqs = arrivals(window, &gaps_and_keys);
        for (&seq, &(offset, ttl, edge, pick, by_new)) in seqs.iter().zip(&timing) {
            let sent = if by_new { &new } else { &old }.sign(command(seq, T0 + offset, ttl)?)?;
            let (earliest, latest) = (sent.issued_at - skew, sent.expires_at + skew);
            let now = match edge {
                0 => earliest,
                1 => latest,
                _ => earliest + (pick % (latest - earliest + 1) as u64) as i64,
            };
            let got = device.verify(&wire(&sent), now);

            // THEN each is accepted as sent
            prop_assert_eq!(code(&got), None, "seq {} at {}", seq, now);
            prop_assert_eq!(got?, sent);
        }
        prop_assert_eq!(Some(device.state().highest()), seqs.iter().max().copied());
    }

    #[test]
    fn rejects_every_replay_of_an_accepted_command(
        count in 1..=64u64,
        replays in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
    ) {
        // GIVEN a device that accepted seqs 1..=count
        let cloud = signer(1, "k1")?;
        let mut device = device(&[&cloud])?;
        let sent: Vec<_> = (1..=count).map(|seq| cloud.sign(command(seq, T0, HOUR)?)).collect::<Result<_, _>>()?;
        for envelope in &sent {
            device.verify(&wire(envelope), T0)?;
        }
        let state = device.state();

        // WHEN any of them arrives again
        for index in replays {
            let got = device.verify(&wire(index.get(&sent)), T0 + 1);

            // THEN it is a replay and the state is unchanged
            prop_assert_eq!(code(&got), Some("replayed"));
            prop_assert_eq!(device.state(), state);
        }
    }

    #[test]
    fn rejects_commands_outside_their_validity_beyond_the_skew(
        offset in 0..1_000_000_000i64,
        ttl in 0..=MAX_TTL,
        skew in 0..=60_000u32,
        beyond in 1..1_000_000_000i64,
    ) {
        // GIVEN a device with some skew tolerance and a valid command
        let cloud = signer(1, "k1")?;
        let mut device = CommandVerifier::new(VerifierConfig { skew_ms: skew, ..config(&[&cloud]) }, ReplayState::default())?;
        let sent = wire(&cloud.sign(command(1, T0 + offset, ttl)?)?);
        let skew = i64::from(skew);

        // WHEN it arrives after its expiry plus the skew, or before its issue minus the skew
        let late = device.verify(&sent, T0 + offset + ttl + skew + beyond);
        let early = device.verify(&sent, T0 + offset - skew - beyond);

        // THEN it is expired, or not yet valid, and nothing was accepted
        prop_assert_eq!(code(&late), Some("expired"));
        prop_assert_eq!(code(&early), Some("not_yet_valid"));
        prop_assert_eq!(device.state(), ReplayState::default());
    }

    #[test]
    fn rejects_unseen_commands_older_than_the_window(
        window in 1..=64u8,
        above in 0..10_000u64,
        old in any::<prop::sample::Index>(),
    ) {
        // GIVEN a device with a window of `window` that accepted only seq `highest`
        let cloud = signer(1, "k1")?;
        let mut device = CommandVerifier::new(VerifierConfig { window, ..config(&[&cloud]) }, ReplayState::default())?;
        let highest = u64::from(window) + 1 + above;
        device.verify(&wire(&cloud.sign(command(highest, T0, HOUR)?)?), T0)?;

        // WHEN a never-seen seq at or below highest - window arrives
        let seq = 1 + old.index((highest - u64::from(window)) as usize) as u64;
        let got = device.verify(&wire(&cloud.sign(command(seq, T0, HOUR)?)?), T0);

        // THEN it is out of order
        prop_assert_eq!(code(&got), Some("out_of_order"));
        prop_assert_eq!(device.state().highest(), highest);
    }

    #[test]
    fn rejects_commands_signed_by_an_impostor_using_a_trusted_kid(
        impostor_seed in 2..=255u8,
        seq in 1..1_000_000u64,
    ) {
        // GIVEN a device trusting key 1 as "k1", and an impostor key also calling itself "k1"
        let mut device = device(&[&signer(1, "k1")?])?;
        let impostor = signer(impostor_seed, "k1")?;

        // WHEN the impostor's command arrives
        let got = device.verify(&wire(&impostor.sign(command(seq, T0, HOUR)?)?), T0);

        // THEN its signature is bad
        prop_assert_eq!(code(&got), Some("bad_signature"));
    }

    #[test]
    fn rejects_commands_changed_after_signing(
        field in 0..7u8,
        delta in 1..1_000i64,
        seq in 1..1_000_000u64,
    ) {
        // GIVEN a device trusting two keys, and a valid command signed with the first
        let (k1, k2) = (signer(1, "k1")?, signer(2, "k2")?);
        let mut device = device(&[&k1, &k2])?;
        let signed = k1.sign(command(seq, T0, HOUR)?)?;
        let mut changed = signed.clone();

        // WHEN one signed field is changed to another valid value
        match field {
            0 => changed.cmd_id.push('x'),
            1 => changed.seq += delta as u64,
            2 => changed.issued_at -= delta,
            3 => changed.expires_at += delta,
            4 => changed.name.push_str(".now"),
            5 => { changed.args.insert("level".into(), json!(3 + delta)); }
            _ => changed.kid = "k2".into(),
        }
        let got = device.verify(&wire(&changed), T0);

        // THEN the signature no longer verifies
        prop_assert_ne!(&changed, &signed);
        prop_assert_eq!(code(&got), Some("bad_signature"));
    }
}
