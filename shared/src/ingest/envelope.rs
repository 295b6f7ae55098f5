//! Envelope decoding: the rule's JSON bytes → one canonical [`Reading`], or every problem found.
//!
//! Two schema versions arrive on the wire:
//! - v1 `{"v":1,"seq":..,"boot":..,"ts":<ms>,"fw":..,"m":{"temp_c":21.5},"bat":87,"up_s":3600,"test":false}`
//! - v2 (SenML-style) `{"v":2,"seq":..,"boot":..,"bt":<ms>,"e":[{"n":"temp_c","v":21.5,"u":"Cel"}],..}`
//!
//! The IoT rule adds `thing`, `rx_ms` and `client_id`. Both versions are upcast to `Reading`
//! before any rule runs. Decoding takes a fast typed path; only a payload that fails it is
//! re-read leniently so that *every* problem can be reported, not just the first.

use crate::env::{BackendKind, ConfigError, Env};
use std::borrow::Cow;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::reason::{Problem, Reason};
use crate::model::{MessageId, Metric, Reading, ReadingFlags, ThingName};

/// IoT Core's message size limit, on the device's payload (IoT Core refuses a larger publish
/// before any rule runs).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// What the topic rule adds to the payload it forwards, with their keys: `thing` (a topic
/// level, ≤ 256 bytes), `topic` (≤ 256 bytes) and `client_id` (≤ 128 bytes), each up to 6
/// bytes per byte once JSON-escaped, and `rx_ms`: (256 + 256 + 128) × 6 plus keys < 4 KiB.
pub const RULE_FIELDS_MAX_BYTES: usize = 4096;
/// The largest body a rule can forward: a full device payload plus the rule's fields.
pub const MAX_BODY_BYTES: usize = MAX_PAYLOAD_BYTES + RULE_FIELDS_MAX_BYTES;

/// The firmware a body says its device runs (`fw`, at the top of a v1 or v2 envelope), read
/// even when the body is refused for something else: whose quarantine it is, for fleet health.
/// `None` when the body is no JSON object, names no valid firmware, or names one twice.
pub fn claimed_fw(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Claimed {
        fw: Option<String>,
    }
    // An object only (serde would read a struct from an array too); unknown fields are
    // skipped; a second `fw` is an error (so `None`).
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let claimed: Claimed = serde_json::from_slice(body).ok()?;
    claimed.fw.filter(|fw| crate::model::validate_label("fw", fw).is_ok())
}
pub use super::strict::MAX_NESTING;
/// Metrics one reading may carry: bounded so one reading fits one 2 KB Timestream record.
pub const MAX_METRICS: usize = 32;
/// Readings one v2 pack may carry (distinct record times `t`).
pub const MAX_READINGS_PER_MESSAGE: usize = 100;
pub const MAX_METRIC_NAME_LEN: usize = 32;
pub const MAX_FW_LEN: usize = crate::model::MAX_LABEL_LEN;
/// 2000-01-01T00:00:00Z: anything earlier is an unset or broken clock.
pub const MIN_VALID_TIME_MS: i64 = 946_684_800_000;
/// Measure names the pipeline itself writes next to the device's metrics.
pub const RESERVED_METRIC_NAMES: [&str; 13] = [
    "bat",
    "up_s",
    "boot",
    "seq",
    "rx_ms",
    "skew",
    "device_ms",
    "schema",
    "thing",
    "class",
    "region",
    "fw",
    "test",
];

/// Time rules, set per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestPolicy {
    /// Device time further than this ahead of `rx_ms` is clock skew.
    pub max_future_skew_ms: i64,
    /// How far back the hot store accepts writes; older readings are archived only (`late`).
    pub hot_window_ms: i64,
}

impl Default for IngestPolicy {
    fn default() -> Self {
        Self { max_future_skew_ms: 5 * 60 * 1000, hot_window_ms: 365 * 24 * 3600 * 1000 }
    }
}

/// A window no reading is older than (about 10,000 years): "the store takes any time".
pub const UNLIMITED_WINDOW_DAYS: i64 = 10_000 * 366;
const MS_PER_DAY: i64 = 86_400_000;

impl IngestPolicy {
    /// The same rules for a store that takes any time (no hot store, or SQLite): nothing is
    /// `late`.
    pub fn unbounded_hot_window(self) -> Self {
        Self { hot_window_ms: UNLIMITED_WINDOW_DAYS * MS_PER_DAY, ..self }
    }

    /// `FLEET_SKEW_TOLERANCE_S` (default 300) and `FLEET_HOT_WINDOW_DAYS` (default: Timestream's
    /// 365-day magnetic retention on AWS, unlimited on SQLite).
    pub fn from_env(env: &Env, backend: &BackendKind) -> Result<Self, ConfigError> {
        let defaults = IngestPolicy::default();
        let default_window_days = match backend {
            BackendKind::Aws => defaults.hot_window_ms / MS_PER_DAY,
            BackendKind::Embedded { .. } => UNLIMITED_WINDOW_DAYS,
        };
        Ok(IngestPolicy {
            max_future_skew_ms: env.positive("FLEET_SKEW_TOLERANCE_S", defaults.max_future_skew_ms / 1000)?
                * 1000,
            hot_window_ms: env
                .positive("FLEET_HOT_WINDOW_DAYS", default_window_days)?
                .min(UNLIMITED_WINDOW_DAYS)
                * MS_PER_DAY,
        })
    }
}

/// A payload that cannot be stored, with everything wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The rule's `thing`, when one could be read (for logs and partitioning only).
    pub thing: Option<String>,
    pub problems: Vec<Problem>,
}

/// Decode, validate and upcast one message body.
pub fn decode(body: &[u8], policy: &IngestPolicy, now_ms: i64) -> Result<Vec<Reading>, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection {
            thing: None,
            problems: vec![Problem::new(
                Reason::PayloadTooLarge,
                None,
                format!(
                    "{} bytes > {MAX_BODY_BYTES} (IoT Core's {MAX_PAYLOAD_BYTES}-byte payload limit plus the rule's fields)",
                    body.len()
                ),
            )],
        });
    }
    // UTF-8, unique keys, bounded nesting: after this, every JSON parser reads the same thing.
    if let Err(problem) = super::strict::check(body) {
        return Err(Rejection { thing: None, problems: vec![problem] });
    }
    match serde_json::from_slice::<Wire<'_>>(body) {
        Ok(wire) => build(wire, Vec::new(), &[], policy, now_ms),
        Err(_) => decode_lenient(body, policy, now_ms),
    }
}

/// Every field either version may carry. Unknown fields are ignored (forward compatible).
#[derive(Default, Deserialize)]
struct Wire<'a> {
    v: Option<u64>,
    #[serde(borrow)]
    thing: Option<&'a str>,
    rx_ms: Option<i64>,
    #[serde(borrow)]
    client_id: Option<&'a str>,
    /// v1: the device's own id, if it sends one.
    #[serde(borrow)]
    dev: Option<&'a str>,
    /// v2: SenML base name, the device's own id.
    #[serde(borrow)]
    bn: Option<&'a str>,
    seq: Option<u64>,
    boot: Option<u32>,
    ts: Option<i64>,
    bt: Option<i64>,
    #[serde(borrow)]
    fw: Option<&'a str>,
    #[serde(borrow)]
    m: Option<Metrics<'a>>,
    #[serde(borrow)]
    e: Option<Vec<Senml<'a>>>,
    bat: Option<f64>,
    up_s: Option<u64>,
    test: Option<bool>,
}

#[derive(Default, Deserialize)]
struct Senml<'a> {
    #[serde(borrow)]
    n: Option<&'a str>,
    v: Option<f64>,
    /// Time offset in ms after the pack's `bt`: records sharing one `t` are one reading.
    t: Option<i64>,
    vs: Option<IgnoredAny>,
    vb: Option<IgnoredAny>,
}

/// A JSON object of metric name → number, keeping order and repeated keys.
#[derive(Default)]
struct Metrics<'a>(Vec<(Cow<'a, str>, f64)>);

impl<'de: 'a, 'a> Deserialize<'de> for Metrics<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Metrics<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of metric name to number")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(k) = map.next_key::<&'de str>()? {
                    out.push((Cow::Borrowed(k), map.next_value::<f64>()?));
                }
                Ok(Metrics(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// The slow path: read the payload as a JSON value and check field by field.
fn decode_lenient(body: &[u8], policy: &IngestPolicy, now_ms: i64) -> Result<Vec<Reading>, Rejection> {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        // Bare NaN / Infinity tokens (Python's json.dumps emits them) are invalid JSON but
        // say exactly what is wrong: read them as strings and report non_finite_value.
        Err(e) => match quote_non_finite_tokens(body).and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(v) => v,
            None => return Err(malformed(format!("not JSON: {e}"))),
        },
    };
    let Value::Object(obj) = &value else {
        return Err(malformed("payload is not a JSON object".to_owned()));
    };
    let mut problems = Vec::new();
    let mut bad = Vec::new();
    let wire = Wire {
        v: field(obj, "v", &mut problems, &mut bad),
        thing: field(obj, "thing", &mut problems, &mut bad),
        rx_ms: field(obj, "rx_ms", &mut problems, &mut bad),
        client_id: field(obj, "client_id", &mut problems, &mut bad),
        dev: field(obj, "dev", &mut problems, &mut bad),
        bn: field(obj, "bn", &mut problems, &mut bad),
        seq: field(obj, "seq", &mut problems, &mut bad),
        boot: field(obj, "boot", &mut problems, &mut bad),
        ts: field(obj, "ts", &mut problems, &mut bad),
        bt: field(obj, "bt", &mut problems, &mut bad),
        fw: field(obj, "fw", &mut problems, &mut bad),
        m: lenient_m(obj, &mut problems, &mut bad),
        e: lenient_e(obj, &mut problems, &mut bad),
        bat: field(obj, "bat", &mut problems, &mut bad),
        up_s: field(obj, "up_s", &mut problems, &mut bad),
        test: field(obj, "test", &mut problems, &mut bad),
    };
    build(wire, problems, &bad, policy, now_ms)
}

fn malformed(detail: String) -> Rejection {
    Rejection { thing: None, problems: vec![Problem::new(Reason::MalformedJson, None, detail)] }
}

/// Read one field; a present value of the wrong type is a `wrong_type` problem.
fn field<'v, T: Deserialize<'v>>(
    obj: &'v Map<String, Value>,
    name: &'static str,
    problems: &mut Vec<Problem>,
    bad: &mut Vec<&'static str>,
) -> Option<T> {
    match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(v) => match T::deserialize(v) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(Problem::new(Reason::WrongType, name.to_owned(), format!("{name}: {e}")));
                bad.push(name);
                None
            }
        },
    }
}

fn is_non_finite_word(s: &str) -> bool {
    matches!(s, "NaN" | "nan" | "Infinity" | "-Infinity" | "inf" | "-inf" | "Inf" | "-Inf")
}

/// A metric value in the lenient path: a number, or the problem with it.
fn metric_value(path: String, v: &Value, problems: &mut Vec<Problem>) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if is_non_finite_word(s) => {
            problems.push(Problem::new(Reason::NonFiniteValue, path.clone(), format!("{path} is {s}")));
            None
        }
        Value::Null => {
            problems.push(Problem::new(Reason::MissingField, path.clone(), format!("{path} is null")));
            None
        }
        other => {
            problems.push(Problem::new(
                Reason::WrongType,
                path.clone(),
                format!("{path} must be a number, got {}", json_type(other)),
            ));
            None
        }
    }
}

fn lenient_m<'v>(
    obj: &'v Map<String, Value>,
    problems: &mut Vec<Problem>,
    bad: &mut Vec<&'static str>,
) -> Option<Metrics<'v>> {
    match obj.get("m")? {
        Value::Null => None,
        Value::Object(m) => {
            let before = problems.len();
            let good = m
                .iter()
                .filter_map(|(k, v)| {
                    Some((Cow::Borrowed(k.as_str()), metric_value(format!("m.{k}"), v, problems)?))
                })
                .collect();
            if problems.len() > before {
                bad.push("m");
            }
            Some(Metrics(good))
        }
        other => {
            problems.push(Problem::new(
                Reason::WrongType,
                "m".to_owned(),
                format!("m must be an object, got {}", json_type(other)),
            ));
            bad.push("m");
            None
        }
    }
}

fn lenient_e<'v>(
    obj: &'v Map<String, Value>,
    problems: &mut Vec<Problem>,
    bad: &mut Vec<&'static str>,
) -> Option<Vec<Senml<'v>>> {
    match obj.get("e")? {
        Value::Null => None,
        Value::Array(items) => {
            let before = problems.len();
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::Object(rec) = item else {
                    problems.push(Problem::new(
                        Reason::WrongType,
                        format!("e[{i}]"),
                        format!("e[{i}] must be an object, got {}", json_type(item)),
                    ));
                    continue;
                };
                let n = match rec.get("n") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    None | Some(Value::Null) => None,
                    Some(other) => {
                        problems.push(Problem::new(
                            Reason::WrongType,
                            format!("e[{i}].n"),
                            format!("e[{i}].n must be a string, got {}", json_type(other)),
                        ));
                        continue;
                    }
                };
                let v = match rec.get("v") {
                    None => None,
                    Some(v) => match metric_value(format!("e[{i}].v"), v, problems) {
                        Some(x) => Some(x),
                        None => continue,
                    },
                };
                let t = match rec.get("t") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
                    Some(other) => {
                        problems.push(Problem::new(
                            Reason::WrongType,
                            format!("e[{i}].t"),
                            format!("e[{i}].t must be an integer offset in ms, got {}", json_type(other)),
                        ));
                        continue;
                    }
                };
                out.push(Senml {
                    n,
                    v,
                    t,
                    vs: rec.get("vs").map(|_| IgnoredAny),
                    vb: rec.get("vb").map(|_| IgnoredAny),
                });
            }
            if problems.len() > before {
                bad.push("e");
            }
            Some(out)
        }
        other => {
            problems.push(Problem::new(
                Reason::WrongType,
                "e".to_owned(),
                format!("e must be an array, got {}", json_type(other)),
            ));
            bad.push("e");
            None
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Turn bare `NaN`, `Infinity` and `-Infinity` value tokens into JSON strings.
/// Returns `None` when there were none (the payload is malformed for another reason).
fn quote_non_finite_tokens(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let (mut in_str, mut esc, mut found) = (false, false, false);
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if in_str {
            out.push(b);
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_str = true;
            out.push(b);
            i += 1;
            continue;
        }
        let rest = &body[i..];
        if let Some(tok) = [&b"-Infinity"[..], b"Infinity", b"NaN"].into_iter().find(|t| rest.starts_with(t))
        {
            out.push(b'"');
            out.extend_from_slice(tok);
            out.push(b'"');
            i += tok.len();
            found = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    found.then_some(out)
}

fn valid_metric_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || name.len() > MAX_METRIC_NAME_LEN {
        return Err(format!(
            "metric name {name:?} must be 1-{MAX_METRIC_NAME_LEN} characters of [A-Za-z0-9_], not starting with a digit"
        ));
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("metric name {name:?} has characters outside [A-Za-z0-9_]"));
    }
    if RESERVED_METRIC_NAMES.contains(&name) || name.starts_with("ts_") || name.starts_with("measure_value") {
        return Err(format!("metric name {name:?} is reserved"));
    }
    Ok(())
}

/// One reading's metrics as the payload named them (a value is `None` when it was unusable).
type RawMetrics<'a> = Vec<(Cow<'a, str>, Option<f64>)>;

/// The rules, the same for both paths: missing fields, identity, time, metrics.
fn build(
    wire: Wire<'_>,
    mut problems: Vec<Problem>,
    bad: &[&str],
    policy: &IngestPolicy,
    now_ms: i64,
) -> Result<Vec<Reading>, Rejection> {
    let require = |present: bool, name: &'static str, problems: &mut Vec<Problem>| {
        if !present && !bad.contains(&name) {
            problems.push(Problem::new(Reason::MissingField, name.to_owned(), format!("{name} is required")));
        }
    };
    let raw_thing = wire.thing.map(str::to_owned);
    let reject = |problems: Vec<Problem>| Rejection { thing: raw_thing.clone(), problems };

    // Version first: the other fields only mean something under a known version.
    let version = match wire.v {
        Some(v @ (1 | 2)) => v as u8,
        Some(v) => {
            problems.push(Problem::new(
                Reason::UnsupportedVersion,
                "v".to_owned(),
                format!("envelope version {v} is not supported (1, 2)"),
            ));
            return Err(reject(problems));
        }
        None => {
            require(false, "v", &mut problems);
            return Err(reject(problems));
        }
    };

    // Identity and anti-spoofing.
    require(wire.thing.is_some(), "thing", &mut problems);
    let thing = wire.thing.and_then(|t| match ThingName::parse(t) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(Problem::new(Reason::InvalidThingName, "thing".to_owned(), e.to_string()));
            None
        }
    });
    if let Some(t) = wire.thing {
        let own_id = if version == 1 { ("dev", wire.dev) } else { ("bn", wire.bn) };
        for (name, claimed) in [("client_id", wire.client_id), own_id] {
            if let Some(c) = claimed.filter(|c| *c != t) {
                problems.push(Problem::new(
                    Reason::ThingMismatch,
                    name.to_owned(),
                    format!("{name} {c:?} does not match topic thing {t:?}"),
                ));
            }
        }
    }
    require(wire.seq.is_some(), "seq", &mut problems);
    require(wire.boot.is_some(), "boot", &mut problems);
    // Both are stored as signed 64-bit integers (Timestream BIGINT, SQLite INTEGER).
    for (name, n) in [("seq", wire.seq), ("up_s", wire.up_s)] {
        if let Some(n) = n.filter(|n| *n > i64::MAX as u64) {
            problems.push(Problem::new(
                Reason::ValueOutOfRange,
                name.to_owned(),
                format!("{name} {n} exceeds 2^63-1"),
            ));
        }
    }

    // Time.
    let (ts_name, ts) = if version == 1 { ("ts", wire.ts) } else { ("bt", wire.bt) };
    require(ts.is_some(), ts_name, &mut problems);
    require(wire.rx_ms.is_some(), "rx_ms", &mut problems);
    for (name, t) in [(ts_name, ts), ("rx_ms", wire.rx_ms)] {
        if let Some(t) = t.filter(|t| *t < MIN_VALID_TIME_MS) {
            problems.push(Problem::new(
                Reason::TimestampOutOfRange,
                name.to_owned(),
                format!("{name} {t} is before 2000-01-01"),
            ));
        }
    }

    // Metrics, upcast to readings: v1 carries one; a v2 pack carries one per distinct record
    // time offset `t` (ms after `bt`, 0 when absent).
    let e_present = wire.e.is_some();
    let groups: Vec<(i64, RawMetrics<'_>)> = if version == 1 {
        require(wire.m.is_some(), "m", &mut problems);
        wire.m.map(|m| vec![(0, m.0.into_iter().map(|(n, v)| (n, Some(v))).collect())]).unwrap_or_default()
    } else {
        require(wire.e.is_some(), "e", &mut problems);
        let mut by_offset: std::collections::BTreeMap<i64, RawMetrics<'_>> = Default::default();
        for (i, rec) in wire.e.unwrap_or_default().into_iter().enumerate() {
            let n = match rec.n {
                Some(n) => n,
                None => {
                    problems.push(Problem::new(
                        Reason::MissingField,
                        format!("e[{i}].n"),
                        format!("e[{i}].n is required"),
                    ));
                    continue;
                }
            };
            if rec.v.is_none() {
                let (reason, detail) = if rec.vs.is_some() || rec.vb.is_some() {
                    (Reason::WrongType, format!("e[{i}] ({n}) must carry a numeric v, not vs/vb"))
                } else {
                    (Reason::MissingField, format!("e[{i}].v is required"))
                };
                problems.push(Problem::new(reason, format!("e[{i}].v"), detail));
            }
            by_offset.entry(rec.t.unwrap_or(0)).or_default().push((Cow::Borrowed(n), rec.v));
        }
        by_offset.into_iter().collect()
    };
    let field = if version == 1 { "m" } else { "e" };
    if groups.len() > MAX_READINGS_PER_MESSAGE {
        problems.push(Problem::new(
            Reason::TooManyReadings,
            field.to_owned(),
            format!("{} readings (distinct t) > {MAX_READINGS_PER_MESSAGE}", groups.len()),
        ));
    }
    // (A seq that is itself too large is reported above.)
    let last_offset = groups.len().saturating_sub(1) as u64;
    if let Some(seq) =
        wire.seq.filter(|s| *s <= i64::MAX as u64 && s.saturating_add(last_offset) > i64::MAX as u64)
    {
        problems.push(Problem::new(
            Reason::ValueOutOfRange,
            "seq".to_owned(),
            format!("seq {seq} plus {} readings exceeds 2^63-1", groups.len()),
        ));
    }
    // `e: []` (or records that all lack a name): nothing to store.
    if version == 2 && e_present && groups.is_empty() && !bad.contains(&field) {
        problems.push(Problem::new(Reason::NoMetrics, field.to_owned(), "no metrics in reading"));
    }
    let mut readings_metrics: Vec<(i64, Vec<Metric>)> = Vec::with_capacity(groups.len());
    for (offset, metrics) in &groups {
        let at = |name: &str| {
            if *offset == 0 {
                format!("{field}.{name}")
            } else {
                format!("{field}@{offset}.{name}")
            }
        };
        if metrics.is_empty() && !bad.contains(&field) {
            problems.push(Problem::new(Reason::NoMetrics, field.to_owned(), "no metrics in reading"));
        }
        if metrics.len() > MAX_METRICS {
            problems.push(Problem::new(
                Reason::TooManyMetrics,
                field.to_owned(),
                format!("{} metrics > {MAX_METRICS}", metrics.len()),
            ));
        }
        let mut out = Vec::with_capacity(metrics.len());
        for (i, (name, value)) in metrics.iter().enumerate() {
            if let Err(detail) = valid_metric_name(name) {
                problems.push(Problem::new(Reason::InvalidMetricName, at(name), detail));
            } else if metrics.len() <= MAX_METRICS && metrics[..i].iter().any(|(n, _)| n == name) {
                problems.push(Problem::new(
                    Reason::InvalidMetricName,
                    at(name),
                    format!("metric {name:?} appears twice"),
                ));
            }
            match value {
                Some(v) if !v.is_finite() => {
                    problems.push(Problem::new(Reason::NonFiniteValue, at(name), format!("{name} is {v}")))
                }
                Some(v) => out.push(Metric { name: name.clone().into_owned(), value: *v }),
                None => {}
            }
        }
        readings_metrics.push((*offset, out));
    }
    // Each reading's own time must be a valid time too.
    if let Some(base) = ts {
        for (offset, _) in &groups {
            match base.checked_add(*offset) {
                Some(t) if t >= MIN_VALID_TIME_MS || base < MIN_VALID_TIME_MS => {}
                _ => problems.push(Problem::new(
                    Reason::TimestampOutOfRange,
                    format!("{field}@{offset}.t"),
                    format!("{ts_name} + t = {base} + {offset} is before 2000-01-01 or out of range"),
                )),
            }
        }
    }

    if let Some(b) = wire.bat.filter(|b| !(0.0..=100.0).contains(b)) {
        problems.push(Problem::new(
            Reason::ValueOutOfRange,
            "bat".to_owned(),
            format!("bat {b} is outside 0-100"),
        ));
    }
    // Firmware versions are labels: what reaches a table, a terminal or a dashboard is
    // 1-48 characters of [A-Za-z0-9._-], never a control character or an escape sequence.
    if let Some(fw) = wire.fw {
        if fw.len() > MAX_FW_LEN {
            problems.push(Problem::new(
                Reason::ValueOutOfRange,
                "fw".to_owned(),
                format!("fw is {} characters > {MAX_FW_LEN}", fw.len()),
            ));
        } else if crate::model::validate_label("fw", fw).is_err() {
            problems.push(Problem::new(
                Reason::InvalidLabel,
                "fw".to_owned(),
                format!("fw {fw:?} must be 1-{MAX_FW_LEN} characters of [A-Za-z0-9._-]"),
            ));
        }
    }

    match (thing, wire.seq, wire.boot, ts, wire.rx_ms) {
        (Some(thing), Some(seq), Some(boot), Some(base_ms), Some(rx_ms))
            if problems.is_empty() && !readings_metrics.is_empty() =>
        {
            Ok(readings_metrics
                .into_iter()
                .enumerate()
                .map(|(i, (offset, metrics))| {
                    let device_time_ms = base_ms + offset;
                    let skew_corrected = device_time_ms > rx_ms + policy.max_future_skew_ms;
                    let time_ms = if skew_corrected { rx_ms } else { device_time_ms };
                    Reading {
                        id: MessageId { thing: thing.clone(), boot, seq: seq + i as u64 },
                        time_ms,
                        device_time_ms,
                        rx_ms,
                        fw: wire.fw.map(str::to_owned),
                        metrics,
                        battery_pct: wire.bat,
                        uptime_s: wire.up_s,
                        test: wire.test.unwrap_or(false),
                        flags: ReadingFlags { skew_corrected, late: time_ms < now_ms - policy.hot_window_ms },
                        schema_version: version,
                    }
                })
                .collect())
        }
        _ => Err(reject(problems)),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn policy_reads_its_variables_with_backend_defaults() -> Result<(), ConfigError> {
        let env = Env::from_pairs(&[("FLEET_SKEW_TOLERANCE_S", "60")]);
        let embedded = IngestPolicy::from_env(&env, &BackendKind::Embedded { db_path: "x".into() })?;
        assert_eq!(embedded.max_future_skew_ms, 60_000);
        assert_eq!(embedded.hot_window_ms, UNLIMITED_WINDOW_DAYS * MS_PER_DAY);
        assert_eq!(IngestPolicy::from_env(&env, &BackendKind::Aws)?.hot_window_ms, 365 * MS_PER_DAY);
        let bad = Env::from_pairs(&[("FLEET_HOT_WINDOW_DAYS", "a year")]);
        assert!(matches!(
            IngestPolicy::from_env(&bad, &BackendKind::Aws),
            Err(ConfigError::Invalid { var: "FLEET_HOT_WINDOW_DAYS", .. })
        ));
        Ok(())
    }
    use super::*;

    const RX: i64 = 1_764_000_000_000;
    const NOW: i64 = RX + 1_000;

    fn v1(extra: &str) -> String {
        format!(
            r#"{{"v":1,"seq":1042,"boot":7,"ts":{},"fw":"1.4.2","m":{{"temp_c":21.5,"hum_pct":40.1}},"bat":87,"up_s":3600,"test":false,"thing":"sensor-001","rx_ms":{RX},"client_id":"sensor-001"{extra}}}"#,
            RX - 100
        )
    }

    fn reasons(body: &str) -> Vec<(Reason, Option<String>)> {
        match decode(body.as_bytes(), &IngestPolicy::default(), NOW) {
            Ok(r) => panic!("expected a rejection, got {r:?}"),
            Err(rej) => rej.problems.into_iter().map(|p| (p.reason, p.field)).collect(),
        }
    }

    fn ok(body: &str) -> Reading {
        let mut readings = decode(body.as_bytes(), &IngestPolicy::default(), NOW).expect("valid payload");
        assert_eq!(readings.len(), 1, "one reading expected");
        readings.remove(0)
    }

    fn f(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn decodes_the_design_v1_envelope() {
        let r = ok(&v1(""));
        assert_eq!(r.id.thing.as_str(), "sensor-001");
        assert_eq!((r.id.boot, r.id.seq), (7, 1042));
        assert_eq!(r.time_ms, RX - 100);
        assert_eq!(
            r.metrics,
            vec![
                Metric { name: "temp_c".into(), value: 21.5 },
                Metric { name: "hum_pct".into(), value: 40.1 }
            ]
        );
        assert_eq!((r.battery_pct, r.uptime_s, r.test, r.schema_version), (Some(87.0), Some(3600), false, 1));
        assert_eq!(r.flags, ReadingFlags::default());
    }

    #[test]
    fn upcasts_v2_senml_to_the_same_reading_as_v1() {
        let v2 = format!(
            r#"{{"v":2,"seq":1042,"boot":7,"bt":{},"fw":"1.4.2","e":[{{"n":"temp_c","v":21.5,"u":"Cel"}},{{"n":"hum_pct","v":40.1,"u":"%RH"}}],"bat":87,"up_s":3600,"thing":"sensor-001","rx_ms":{RX},"client_id":"sensor-001"}}"#,
            RX - 100
        );
        let (a, b) = (ok(&v1("")), ok(&v2));
        assert_eq!(Reading { schema_version: 1, ..b }, a);
    }

    #[test]
    fn escaped_strings_take_the_slow_path_to_the_same_result() {
        let escaped = v1("").replace(r#""fw":"1.4.2""#, r#""fw":"1.4\u002e2""#);
        assert_eq!(ok(&escaped), ok(&v1("")));
    }

    #[test]
    fn ignores_unknown_fields() {
        assert_eq!(ok(&v1(r#","rssi":-71,"extra":{"a":[1,2]}"#)), ok(&v1("")));
    }

    #[test]
    fn reports_malformed_json_and_non_objects() {
        assert_eq!(reasons(r#"{"v":1,"seq":"#), vec![(Reason::MalformedJson, None)]);
        assert_eq!(reasons("[1,2]"), vec![(Reason::MalformedJson, None)]);
        assert_eq!(reasons(""), vec![(Reason::MalformedJson, None)]);
    }

    #[test]
    fn the_iot_limit_is_on_the_device_payload_not_on_what_the_rule_adds() {
        // GIVEN a device payload of exactly 128 KiB, forwarded with the rule's fields
        let rule_fields = format!(r#","thing":"sensor-001","rx_ms":{RX},"client_id":"sensor-001"}}"#);
        let device = |len: usize| {
            let head = format!(r#"{{"v":1,"seq":1,"boot":7,"ts":{},"m":{{"t":1}},"pad":""#, RX - 100);
            let pad = len - head.len() - 2; // the closing quote and brace
            format!("{head}{}\"}}", "x".repeat(pad))
        };
        let exact = device(MAX_PAYLOAD_BYTES);
        assert_eq!(exact.len(), MAX_PAYLOAD_BYTES);
        let body = format!("{}{rule_fields}", &exact[..exact.len() - 1]);
        assert!(body.len() > MAX_PAYLOAD_BYTES);
        // THEN it is accepted, as IoT Core accepts it
        assert_eq!(ok(&body).id.seq, 1);
        // AND a body beyond what any rule could forward is refused
        let big = v1(&format!(r#","pad":"{}""#, "x".repeat(MAX_BODY_BYTES)));
        assert_eq!(reasons(&big), vec![(Reason::PayloadTooLarge, None)]);
    }

    #[test]
    fn a_repeated_key_anywhere_is_refused_not_read_last_wins() {
        // Two "v" keys once changed the schema version a message was read with.
        let two_versions = v1("").replacen(r#""v":1,"#, r#""v":1,"v":2,"#, 1);
        assert_eq!(reasons(&two_versions), vec![(Reason::DuplicateKey, f("v"))]);
        // A second "m" once replaced the metrics.
        assert_eq!(reasons(&v1(r#","m":{"temp_c":99}"#)), vec![(Reason::DuplicateKey, f("m"))]);
        let inner = v1("").replace(r#""temp_c":21.5"#, r#""temp_c":21.5,"temp_c":99"#);
        assert_eq!(reasons(&inner), vec![(Reason::DuplicateKey, f("m.temp_c"))]);
        let unknown = v1(r#","meta":{"a":{"b":1,"b":2}}"#);
        assert_eq!(reasons(&unknown), vec![(Reason::DuplicateKey, f("meta.a.b"))]);
    }

    #[test]
    fn invalid_utf8_and_deep_nesting_are_reported_as_what_they_are() {
        let mut body = v1("").into_bytes();
        let at = body.windows(5).position(|w| w == b"1.4.2").expect("fw");
        body[at + 1] = 0xff;
        let r = decode(&body, &IngestPolicy::default(), NOW).expect_err("invalid UTF-8");
        assert_eq!(r.problems.iter().map(|p| p.reason).collect::<Vec<_>>(), vec![Reason::InvalidUtf8]);
        let deep = v1(&format!(r#","x":{}0{}"#, "[".repeat(40), "]".repeat(40)));
        assert_eq!(reasons(&deep).first().map(|r| r.0), Some(Reason::NestingTooDeep));
    }

    #[test]
    fn values_that_would_poison_a_store_or_a_terminal_are_refused() {
        let up = v1("").replace(r#""up_s":3600"#, r#""up_s":9223372036854775808"#);
        assert_eq!(reasons(&up), vec![(Reason::ValueOutOfRange, f("up_s"))]);
        let max = v1("").replace(r#""up_s":3600"#, r#""up_s":9223372036854775807"#);
        assert_eq!(ok(&max).uptime_s, Some(i64::MAX as u64));
        for fw in [r#"1.4\u001b[31m"#, "1.4 2", "1.4/2", r#"1.4\n"#, ""] {
            let body = v1("").replace(r#""fw":"1.4.2""#, &format!(r#""fw":"{fw}""#));
            assert_eq!(reasons(&body), vec![(Reason::InvalidLabel, f("fw"))], "fw {fw}");
        }
        let rc = v1("").replace(r#""fw":"1.4.2""#, r#""fw":"2.0.0-rc_1""#);
        assert_eq!(ok(&rc).fw.as_deref(), Some("2.0.0-rc_1"));
    }

    #[test]
    fn reports_unsupported_and_missing_versions() {
        assert_eq!(
            reasons(&v1("").replace(r#""v":1"#, r#""v":3"#)),
            vec![(Reason::UnsupportedVersion, f("v"))]
        );
        assert_eq!(reasons(&v1("").replace(r#""v":1,"#, "")), vec![(Reason::MissingField, f("v"))]);
        assert_eq!(reasons(&v1("").replace(r#""v":1"#, r#""v":"1""#)), vec![(Reason::WrongType, f("v"))]);
    }

    #[test]
    fn reports_every_missing_field_at_once() {
        let body = format!(r#"{{"v":1,"thing":"sensor-001","rx_ms":{RX}}}"#);
        assert_eq!(
            reasons(&body),
            vec![
                (Reason::MissingField, f("seq")),
                (Reason::MissingField, f("boot")),
                (Reason::MissingField, f("ts")),
                (Reason::MissingField, f("m")),
            ]
        );
    }

    #[test]
    fn reports_wrong_types_without_also_calling_them_missing() {
        let body = v1("").replace(r#""seq":1042"#, r#""seq":"1042""#).replace(r#""boot":7"#, r#""boot":-1"#);
        assert_eq!(reasons(&body), vec![(Reason::WrongType, f("seq")), (Reason::WrongType, f("boot"))]);
        let body = v1("").replace(r#""m":{"temp_c":21.5,"hum_pct":40.1}"#, r#""m":[21.5]"#);
        assert_eq!(reasons(&body), vec![(Reason::WrongType, f("m"))]);
        let body = v1("").replace(r#""temp_c":21.5"#, r#""temp_c":true"#);
        assert_eq!(reasons(&body), vec![(Reason::WrongType, f("m.temp_c"))]);
    }

    #[test]
    fn reports_invalid_thing_names_and_spoofing() {
        let bad = v1("")
            .replace(r#""thing":"sensor-001""#, r#""thing":"sensor 001""#)
            .replace(r#""client_id":"sensor-001""#, r#""client_id":"sensor 001""#);
        assert_eq!(reasons(&bad), vec![(Reason::InvalidThingName, f("thing"))]);
        let spoof = v1("").replace(r#""client_id":"sensor-001""#, r#""client_id":"sensor-002""#);
        assert_eq!(reasons(&spoof), vec![(Reason::ThingMismatch, f("client_id"))]);
        assert_eq!(reasons(&v1(r#","dev":"sensor-009""#)), vec![(Reason::ThingMismatch, f("dev"))]);
        assert_eq!(ok(&v1(r#","dev":"sensor-001""#)).id.thing.as_str(), "sensor-001");
    }

    #[test]
    fn reports_non_finite_values_including_bare_nan_tokens() {
        let bare = v1("").replace("21.5", "NaN").replace("40.1", "-Infinity");
        assert_eq!(
            reasons(&bare),
            vec![(Reason::NonFiniteValue, f("m.temp_c")), (Reason::NonFiniteValue, f("m.hum_pct"))]
        );
        let quoted = v1("").replace("21.5", r#""Infinity""#);
        assert_eq!(reasons(&quoted), vec![(Reason::NonFiniteValue, f("m.temp_c"))]);
        // a NaN inside a string is just text
        assert_eq!(ok(&v1(r#","note":"NaN here""#)).metrics.len(), 2);
    }

    #[test]
    fn reports_bad_metric_names_counts_and_repeats() {
        let m = |body: &str| v1("").replace(r#""m":{"temp_c":21.5,"hum_pct":40.1}"#, body);
        assert_eq!(reasons(&m(r#""m":{"temp c":1}"#)), vec![(Reason::InvalidMetricName, f("m.temp c"))]);
        assert_eq!(reasons(&m(r#""m":{"1st":1}"#)), vec![(Reason::InvalidMetricName, f("m.1st"))]);
        assert_eq!(reasons(&m(r#""m":{"bat":1}"#)), vec![(Reason::InvalidMetricName, f("m.bat"))]);
        // A repeated key is refused before the metrics are read (duplicate_key, not last wins).
        assert_eq!(reasons(&m(r#""m":{"a":1,"a":2}"#)), vec![(Reason::DuplicateKey, f("m.a"))]);
        let long = format!(r#""m":{{"{}":1}}"#, "a".repeat(MAX_METRIC_NAME_LEN + 1));
        assert_eq!(reasons(&m(&long))[0].0, Reason::InvalidMetricName);
        assert_eq!(reasons(&m(r#""m":{}"#)), vec![(Reason::NoMetrics, f("m"))]);
        let many: Vec<String> = (0..=MAX_METRICS).map(|i| format!(r#""k{i}":{i}"#)).collect();
        assert_eq!(
            reasons(&m(&format!(r#""m":{{{}}}"#, many.join(",")))),
            vec![(Reason::TooManyMetrics, f("m"))]
        );
    }

    #[test]
    fn reports_out_of_range_values_and_times() {
        assert_eq!(
            reasons(&v1("").replace(r#""bat":87"#, r#""bat":101"#)),
            vec![(Reason::ValueOutOfRange, f("bat"))]
        );
        let seq = v1("").replace(r#""seq":1042"#, &format!(r#""seq":{}"#, u64::MAX));
        assert_eq!(reasons(&seq), vec![(Reason::ValueOutOfRange, f("seq"))]);
        let old = v1("").replace(&format!(r#""ts":{}"#, RX - 100), r#""ts":946684799999"#);
        assert_eq!(reasons(&old), vec![(Reason::TimestampOutOfRange, f("ts"))]);
        let negative = v1("").replace(&format!(r#""ts":{}"#, RX - 100), r#""ts":-1"#);
        assert_eq!(reasons(&negative), vec![(Reason::TimestampOutOfRange, f("ts"))]);
    }

    #[test]
    fn v2_requires_numeric_named_entries() {
        let body = format!(
            r#"{{"v":2,"seq":1,"boot":1,"bt":{RX},"e":[{{"v":1.0}},{{"n":"door","vb":true}},{{"n":"x"}},{{"n":"y","v":"hot"}}],"thing":"sensor-001","rx_ms":{RX}}}"#
        );
        assert_eq!(
            reasons(&body),
            vec![
                (Reason::WrongType, f("e[3].v")),
                (Reason::MissingField, f("e[0].n")),
                (Reason::WrongType, f("e[1].v")),
                (Reason::MissingField, f("e[2].v")),
            ]
        );
        let spoof = format!(
            r#"{{"v":2,"seq":1,"boot":1,"bt":{RX},"bn":"other","e":[{{"n":"x","v":1}}],"thing":"sensor-001","rx_ms":{RX}}}"#
        );
        assert_eq!(reasons(&spoof), vec![(Reason::ThingMismatch, f("bn"))]);
    }

    #[test]
    fn stores_readings_from_a_fast_clock_at_arrival_time() {
        let policy = IngestPolicy::default();
        let ahead = v1("").replace(
            &format!(r#""ts":{}"#, RX - 100),
            &format!(r#""ts":{}"#, RX + policy.max_future_skew_ms + 1),
        );
        let r = ok(&ahead);
        assert!(r.flags.skew_corrected);
        assert_eq!((r.time_ms, r.device_time_ms), (RX, RX + policy.max_future_skew_ms + 1));
        let within = v1("").replace(
            &format!(r#""ts":{}"#, RX - 100),
            &format!(r#""ts":{}"#, RX + policy.max_future_skew_ms),
        );
        assert!(!ok(&within).flags.skew_corrected);
    }

    fn pack(records: &str) -> String {
        format!(
            r#"{{"v":2,"seq":100,"boot":3,"bt":{},"fw":"2.0.1","e":[{records}],"thing":"sensor-001","rx_ms":{RX},"client_id":"sensor-001"}}"#,
            RX - 5_000
        )
    }

    #[test]
    fn a_v2_pack_carries_one_reading_per_record_time_each_with_its_own_seq() {
        // GIVEN a pack: two records at bt, one at bt+1 s, two at bt+2 s (records in any order)
        let body = pack(
            r#"{"n":"temp_c","v":20.5},{"n":"temp_c","v":20.9,"t":2000},{"n":"hum_pct","v":40},{"n":"temp_c","v":20.7,"t":1000},{"n":"hum_pct","v":41,"t":2000}"#,
        );
        // WHEN it is decoded
        let readings = decode(body.as_bytes(), &IngestPolicy::default(), NOW).expect("a valid pack");
        // THEN three readings, in time order, seq 100.., each with its own time and metrics
        let seen: Vec<(u64, i64, usize)> =
            readings.iter().map(|r| (r.id.seq, r.time_ms, r.metrics.len())).collect();
        assert_eq!(seen, vec![(100, RX - 5_000, 2), (101, RX - 4_000, 1), (102, RX - 3_000, 2)]);
        assert!(readings.iter().all(|r| r.fw.as_deref() == Some("2.0.1") && r.schema_version == 2));
        assert_eq!(readings[2].metrics[1], Metric { name: "hum_pct".into(), value: 41.0 });
    }

    #[test]
    fn a_pack_is_refused_whole_when_any_reading_is_bad() {
        // A name repeated within one reading (same t) is refused, with where it is.
        let repeated =
            pack(r#"{"n":"temp_c","v":1},{"n":"temp_c","v":2,"t":1000},{"n":"temp_c","v":3,"t":1000}"#);
        assert_eq!(reasons(&repeated), vec![(Reason::InvalidMetricName, f("e@1000.temp_c"))]);
        // The same name at different times is fine: those are different readings.
        let spread = pack(r#"{"n":"temp_c","v":1},{"n":"temp_c","v":2,"t":1000}"#);
        assert_eq!(decode(spread.as_bytes(), &IngestPolicy::default(), NOW).map(|r| r.len()), Ok(2));
        // More readings than a message may carry.
        let many: Vec<String> =
            (0..=MAX_READINGS_PER_MESSAGE).map(|i| format!(r#"{{"n":"t","v":1,"t":{i}}}"#)).collect();
        assert_eq!(reasons(&pack(&many.join(","))), vec![(Reason::TooManyReadings, f("e"))]);
        // A record time that is not an integer offset.
        let bad_t = pack(r#"{"n":"temp_c","v":1,"t":"soon"}"#);
        assert_eq!(reasons(&bad_t)[0], (Reason::WrongType, f("e[0].t")));
        // A reading before 2000 through a negative offset.
        let early = pack(&format!(r#"{{"n":"temp_c","v":1,"t":-{RX}}}"#));
        assert_eq!(reasons(&early)[0].0, Reason::TimestampOutOfRange);
    }

    #[test]
    fn keeps_late_readings_at_device_time_and_flags_them() {
        let policy = IngestPolicy { max_future_skew_ms: 300_000, hot_window_ms: 3_600_000 };
        let body = v1("").replace(&format!(r#""ts":{}"#, RX - 100), &format!(r#""ts":{}"#, RX - 7_200_000));
        let r = decode(body.as_bytes(), &policy, NOW).expect("late data is valid").remove(0);
        assert!(r.flags.late);
        assert_eq!(r.time_ms, RX - 7_200_000, "never re-stamped");
    }

    #[test]
    fn the_firmware_a_body_claims_is_read_whatever_else_is_wrong_with_it() {
        assert_eq!(claimed_fw(br#"{"v":1,"fw":"1.5.0","bat":150}"#).as_deref(), Some("1.5.0"));
        assert_eq!(claimed_fw(br#"{"v":2,"e":"not a pack","fw":"2.0"}"#).as_deref(), Some("2.0"));
        for body in [
            &br#"{"fw":"1.5.0","fw":"1.6.0"}"#[..],
            br#"{"fw":"\u001b[31m"}"#,
            br#"{"fw":15}"#,
            br#"{"v":1}"#,
            br#"["fw"]"#,
            b"{\"fw\":\"1.5.0\"",
            b"\xff\xfe",
        ] {
            assert_eq!(claimed_fw(body), None, "{}", String::from_utf8_lossy(body));
        }
    }
}
