//! Showing device-supplied text to people. Validation keeps control characters out of what is
//! stored from now on (thing names, `fw`, metric names), but a table or a page also shows
//! older rows, quarantine details and operator input: every such string goes through
//! [`printable`], so an escape sequence can never reach an operator's terminal and a
//! direction override can never reorder what a page shows.

use std::borrow::Cow;

/// Characters that must not be shown as themselves: C0/C1 controls (ESC, CR, LF, BEL, ...)
/// and the Unicode direction controls ("Trojan Source").
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as a `\u{..}` escape (unchanged, and not copied,
/// when there is none).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_direction_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("sensor-001 ✓ 1.4.2"), Cow::Borrowed(_)));
        assert_eq!(printable("1.4\u{1b}[31m"), "1.4\\u{1b}[31m");
        assert_eq!(printable("a\r\nb\u{7}"), "a\\u{d}\\u{a}b\\u{7}");
        assert_eq!(printable("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(printable("\u{9b}2J"), "\\u{9b}2J");
    }
}
