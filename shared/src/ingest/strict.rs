//! The structural check every payload passes before it is read: UTF-8 throughout, no object
//! (at any depth) naming a key twice, nesting no deeper than [`MAX_NESTING`].
//!
//! Two JSON parsers disagree on duplicate keys (first wins, last wins, or an error), so a
//! payload with one could make the cloud read something other than what IoT Core's rules
//! engine read: two `"v"` keys, or a second `"m"` replacing the metrics. Such a payload is
//! refused with the key's path; so is invalid UTF-8 (JSON text is UTF-8), with its byte offset.
//!
//! One pass, no allocation on the usual path (keys are compared as borrowed slices; only keys
//! with escapes are unescaped into a string).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::reason::{Problem, Reason};

/// How deep objects and arrays may nest. The envelope needs 3 (payload → `e` → record);
/// the rest is room for fields this version ignores.
pub const MAX_NESTING: usize = 16;
/// Objects with more keys than this are checked with a hash set instead of a scan.
const SCAN_KEYS: usize = 16;

/// `Ok` when the payload is well-formed UTF-8 JSON with unique keys and bounded nesting;
/// otherwise the one problem that says what is wrong and where. Syntax errors are left to the
/// decoder, which reports them with every other problem it can find.
pub fn check(body: &[u8]) -> Result<(), Problem> {
    if let Err(e) = std::str::from_utf8(body) {
        let at = e.valid_up_to();
        return Err(Problem::new(
            Reason::InvalidUtf8,
            None,
            format!("invalid UTF-8 at byte {at} (0x{:02x}): JSON text must be UTF-8", body[at]),
        ));
    }
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    // Our depth limit is far below serde_json's own (128), so its limit never decides.
    match (Node { found: &found, depth: 0 }).deserialize(&mut de) {
        Ok(()) => Ok(()),
        Err(_) => match found.into_inner() {
            Some(problem) => Err(problem),
            None => Ok(()), // a syntax error: the decoder reports it
        },
    }
}

/// One JSON value at some depth; on a problem it records it in `found` and fails.
#[derive(Clone, Copy)]
struct Node<'c> {
    found: &'c RefCell<Option<Problem>>,
    depth: usize,
}

impl Node<'_> {
    fn fail<E: serde::de::Error>(&self, problem: Problem) -> E {
        *self.found.borrow_mut() = Some(problem);
        E::custom("structure")
    }

    fn deeper<E: serde::de::Error>(&self) -> Result<Self, E> {
        if self.depth >= MAX_NESTING {
            return Err(self.fail(Problem::new(
                Reason::NestingTooDeep,
                None,
                format!("objects and arrays nest deeper than {MAX_NESTING} levels"),
            )));
        }
        Ok(Node { found: self.found, depth: self.depth + 1 })
    }

    /// Put `segment` in front of the recorded problem's field path as the error unwinds.
    fn prefix(&self, segment: impl fmt::Display) {
        if let Some(p) = self.found.borrow_mut().as_mut() {
            p.field = Some(match p.field.take() {
                None => segment.to_string(),
                Some(rest) if rest.starts_with('[') => format!("{segment}{rest}"),
                Some(rest) => format!("{segment}.{rest}"),
            });
            if p.reason == Reason::NestingTooDeep {
                p.detail = format!(
                    "{} nests deeper than {MAX_NESTING} levels",
                    p.field.as_deref().unwrap_or_default()
                );
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let child = self.deeper()?;
        let mut i = 0usize;
        loop {
            match seq.next_element_seed(child) {
                Ok(Some(())) => i += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.prefix(format_args!("[{i}]"));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let child = self.deeper()?;
        let mut keys: Vec<Cow<'de, str>> = Vec::new();
        let mut many: Option<std::collections::HashSet<Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let repeated = match &mut many {
                Some(set) => !set.insert(key.clone()),
                None => keys.contains(&key),
            };
            if repeated {
                let problem = Problem::new(
                    Reason::DuplicateKey,
                    key.to_string(),
                    format!("key {key:?} appears twice in one object"),
                );
                return Err(self.fail(problem));
            }
            if let Err(e) = map.next_value_seed(child) {
                self.prefix(&key);
                return Err(e);
            }
            match &mut many {
                Some(_) => {}
                None if keys.len() < SCAN_KEYS => keys.push(key),
                None => {
                    let mut set: std::collections::HashSet<_> = keys.drain(..).collect();
                    set.insert(key);
                    many = Some(set);
                }
            }
        }
        Ok(())
    }
}

/// An object key, borrowed from the payload unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(body: &str) -> Option<Problem> {
        check(body.as_bytes()).err()
    }

    #[test]
    fn unique_keys_at_every_level_pass() {
        assert_eq!(
            problem(r#"{"v":1,"m":{"a":1,"b":2},"e":[{"n":"a"},{"n":"a"}],"x":{"y":{"z":[1,{"a":1}]}}}"#),
            None
        );
        // A syntax error is the decoder's to report.
        assert_eq!(problem(r#"{"v":1,"#), None);
    }

    #[test]
    fn a_repeated_key_is_refused_with_its_path_at_any_depth() {
        let p = problem(r#"{"v":1,"m":{"t":1},"v":2}"#).expect("duplicate");
        assert_eq!((p.reason, p.field.as_deref()), (Reason::DuplicateKey, Some("v")));
        let p = problem(r#"{"v":1,"m":{"t":1,"t":2}}"#).expect("duplicate");
        assert_eq!(p.field.as_deref(), Some("m.t"));
        let p = problem(r#"{"e":[{"n":"a"},{"n":"a","n":"b"}]}"#).expect("duplicate");
        assert_eq!(p.field.as_deref(), Some("e[1].n"));
        // Escapes do not hide a repeat: "\u0076" is "v".
        let p = problem(r#"{"v":1,"\u0076":2}"#).expect("duplicate");
        assert_eq!(p.field.as_deref(), Some("v"));
        // Large objects are checked too.
        let many: String = (0..40).map(|i| format!("\"k{i}\":{i},")).collect();
        let p = problem(&format!("{{{many}\"k7\":0}}")).expect("duplicate");
        assert_eq!(p.field.as_deref(), Some("k7"));
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_offset() {
        let mut body = br#"{"fw":"1.4"#.to_vec();
        body.extend_from_slice(&[0xff, b'"', b'}']);
        let p = check(&body).expect_err("invalid UTF-8");
        assert_eq!(p.reason, Reason::InvalidUtf8);
        assert!(p.detail.contains("byte 10"), "{}", p.detail);
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_with_where() {
        let ok = format!("{}1{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert_eq!(problem(&ok), None);
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        let p = problem(&deep).expect("too deep");
        assert_eq!(p.reason, Reason::NestingTooDeep);
        assert!(p.field.as_deref().is_some_and(|f| f.starts_with("x[0]")), "{p:?}");
        // Far beyond serde_json's own limit: still our reason, never a stack overflow.
        let abyss = "[".repeat(100_000);
        assert_eq!(problem(&abyss).map(|p| p.reason), Some(Reason::NestingTooDeep));
    }
}
