//! Text that came from outside (a pod's request, an Azure error message) on its way into a bounded or
//! line-oriented place: a Kubernetes Event note, an annotation, a log line.
//!
//! Rust strings are UTF-8, and cutting one at a byte offset inside a character panics
//! (`String::truncate`), so every bound goes through [`truncate`], which cuts on a character boundary.
//! Line-oriented sinks go through [`escape_controls`], so a value carrying `\n` cannot start a line of
//! its own.

use std::borrow::Cow;

/// Longest Event note the API server accepts, in bytes (`events.k8s.io/v1` validation:
/// `note` must be at most 1 KiB). Notes are cut a little below it.
pub const EVENT_NOTE_MAX_BYTES: usize = 1000;

/// What marks text that was cut.
const ELLIPSIS: char = '…';

/// `text` cut to at most `max_bytes` bytes on a character boundary, ending with `…` when something was
/// cut (the ellipsis counts towards `max_bytes`; a `max_bytes` smaller than the ellipsis gives the
/// longest prefix that fits, possibly empty). Never panics, whatever the bytes and the bound.
pub fn truncate(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let room = max_bytes.checked_sub(ELLIPSIS.len_utf8());
    let end = floor_char_boundary(text, room.unwrap_or(max_bytes));
    match room {
        Some(_) => Cow::Owned(format!("{}{ELLIPSIS}", &text[..end])),
        None => Cow::Borrowed(&text[..end]),
    }
}

/// The largest index `<= at` that is a character boundary of `text`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut end = at.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// `text` with every control character (line breaks, tabs, escape sequences, `\0`, the C1 range and
/// the Unicode line and paragraph separators) written as a Rust escape (`\n`, `\u{1b}`), and `\`
/// itself doubled so that an escape in the output always means one in the input. Borrowed when there
/// is nothing to escape.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\\' || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs(c) {
            out.extend(c.escape_default());
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
    fn a_bound_inside_a_character_cuts_before_it() {
        // A deny message quoting a long client_id: ASCII, then two-byte characters, so that byte 1000
        // falls inside one.
        let text = format!("{}{}", "a".repeat(991), "é".repeat(20));
        assert!(!text.is_char_boundary(EVENT_NOTE_MAX_BYTES));
        let cut = truncate(&text, EVENT_NOTE_MAX_BYTES);
        assert!(cut.len() <= EVENT_NOTE_MAX_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with(&"a".repeat(991)));
    }

    #[test]
    fn every_bound_on_every_kind_of_character_holds() {
        for text in [
            "é".repeat(700),
            "€".repeat(500),
            "😀".repeat(400),
            format!("x{}", "😀".repeat(400)),
            "plain".repeat(300),
        ] {
            for max in 0..12 {
                let cut = truncate(&text, max);
                assert!(cut.len() <= max, "{max}: {cut:?}");
            }
            for max in [999, 1000, 1001, 1002, 1003] {
                let cut = truncate(&text, max);
                assert!(cut.len() <= max && cut.ends_with('…'), "{max}");
            }
        }
    }

    #[test]
    fn short_text_is_kept_as_it_is() {
        assert!(matches!(truncate("short", 1000), Cow::Borrowed("short")));
        assert_eq!(truncate("", 0), "");
        assert_eq!(truncate("exactly", 7), "exactly");
        assert_eq!(truncate("exactly!", 7), "exac…");
    }

    #[test]
    fn control_characters_cannot_start_a_line() {
        let forged = "x\n2026-11-30T00:00:00Z  INFO forged line\r\u{1b}[31m\u{0}\u{85}\u{2028}";
        let escaped = escape_controls(forged);
        assert!(!escaped.chars().any(|c| c.is_control()), "{escaped}");
        assert!(!escaped.contains('\u{2028}'));
        assert_eq!(
            escaped,
            "x\\n2026-11-30T00:00:00Z  INFO forged line\\r\\u{1b}[31m\\u{0}\\u{85}\\u{2028}"
        );
    }

    #[test]
    fn backslashes_are_doubled_so_escapes_are_unambiguous() {
        assert_eq!(escape_controls("a\\nb"), "a\\\\nb");
        assert_eq!(escape_controls("a\nb"), "a\\nb");
        assert!(matches!(escape_controls("clean é"), Cow::Borrowed(_)));
    }
}
