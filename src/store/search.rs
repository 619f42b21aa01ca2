//! Search (`events list --search TEXT`, `/api/events?search=TEXT`, the
//! page's search box): which text of an event is searchable and what
//! "contains" means, written once for every backend (README "Search").
//!
//! A backend indexes [`event_text`] of each event (SQLite: an FTS5 table;
//! PostgreSQL: a `tsvector` or trigram index) only to find candidates
//! quickly; [`contains`] on the same text decides. So an index may return
//! more than the answer, never less, and every backend gives the same
//! answer.
//!
//! Nothing here does I/O or knows a database.

use serde_json::Value;

/// Most bytes of an event's text that are searchable: a large body is
/// searched in its first 64 KiB.
pub const MAX_TEXT: usize = 64 * 1024;

/// The searchable text of an event: every value of its normalized payload
/// (strings as they are, so a form's percent-decoded fields, numbers and
/// booleans as JSON writes them; not the keys), one per line; or, for an
/// event with no normalized view (a type stored raw), its body as UTF-8.
/// Cut at [`MAX_TEXT`] bytes.
pub fn event_text(payload: Option<&Value>, body: &[u8]) -> String {
    let mut out = String::new();
    match payload {
        Some(v) if !v.is_null() => push_values(v, &mut out),
        _ => out.push_str(&String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT + 4)])),
    }
    cut(&mut out);
    out
}

fn push_values(v: &Value, out: &mut String) {
    if out.len() > MAX_TEXT {
        return;
    }
    match v {
        Value::Object(map) => map.values().for_each(|v| push_values(v, out)),
        Value::Array(items) => items.iter().for_each(|v| push_values(v, out)),
        Value::String(s) => line(out, s),
        Value::Number(n) => line(out, &n.to_string()),
        Value::Bool(b) => line(out, if *b { "true" } else { "false" }),
        Value::Null => line(out, "null"),
    }
}

fn line(out: &mut String, s: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(s);
}

/// Cuts `s` to at most [`MAX_TEXT`] bytes, on a character boundary.
fn cut(s: &mut String) {
    if s.len() <= MAX_TEXT {
        return;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// The words of `text`: its runs of letters and digits, lower-cased.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !is_word(c)).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Why `text` cannot be searched for, if it cannot: it needs a letter or a digit.
pub fn check(text: &str) -> Result<(), String> {
    if words(text).is_empty() {
        return Err(format!("`{text}` has no letter or digit to search for"));
    }
    Ok(())
}

/// Whether `haystack` contains `needle`, ignoring case, as whole words: the
/// match neither starts nor ends inside a word (`golden` is found in `Dan
/// Golden` and `golden@x.com`, not in `dgolden`). Punctuation in `needle`
/// must be there as written (`dgolden@mid-corp.com`).
pub fn contains(haystack: &str, needle: &str) -> bool {
    let needle = needle.to_lowercase();
    if needle.is_empty() {
        return true;
    }
    let hay = haystack.to_lowercase();
    let starts_word = needle.chars().next().is_some_and(is_word);
    let ends_word = needle.chars().next_back().is_some_and(is_word);
    let mut from = 0;
    while let Some(at) = hay[from..].find(&needle) {
        let start = from + at;
        let end = start + needle.len();
        let before_ok = !starts_word || !hay[..start].chars().next_back().is_some_and(is_word);
        let after_ok = !ends_word || !hay[end..].chars().next().is_some_and(is_word);
        if before_ok && after_ok {
            return true;
        }
        from = start + hay[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_text_is_every_payload_value_or_else_the_body() {
        let form = json!({"email": ["Dan.Golden@Mid-Corp.com"], "n": 5, "ok": true, "none": null, "deep": {"id": "c-17"}});
        let text = event_text(Some(&form), b"ignored");
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["5", "Dan.Golden@Mid-Corp.com", "c-17", "null", "true"]);
        assert_eq!(event_text(None, b"raw body"), "raw body");
        assert_eq!(event_text(Some(&Value::Null), b"\xffraw"), "\u{fffd}raw");
        let big = "x".repeat(MAX_TEXT + 10);
        assert_eq!(event_text(Some(&json!([big])), b"").len(), MAX_TEXT, "cut");
        assert_eq!(event_text(None, "é".repeat(MAX_TEXT).as_bytes()).len(), MAX_TEXT, "cut on a character boundary");
    }

    #[test]
    fn search_matches_whole_words_ignoring_case() {
        let text = "Dan Golden\ndgolden@mid-corp.com\nc-17";
        for (needle, want) in [
            ("dgolden@mid-corp.com", true),
            ("DGOLDEN@MID-CORP.COM", true),
            ("golden", true),
            ("Dan Golden", true),
            ("mid-corp", true),
            ("olden", false),
            ("dgolde", false),
            ("mid-corp.co", false),
            ("c-17", true),
            ("c-1", false),
            ("@mid", true),
            ("nobody@x.y", false),
        ] {
            assert_eq!(contains(text, needle), want, "{needle}");
        }
        assert!(contains("Łukasz Żółć", "żółć"), "any script");
        assert!(contains("aa aab", "aab"), "a later occurrence counts");
    }

    #[test]
    fn words_are_runs_of_letters_and_digits() {
        assert_eq!(words("Dgolden@Mid-Corp.com"), ["dgolden", "mid", "corp", "com"]);
        assert!(check("@-.").is_err());
        assert!(check("a").is_ok());
    }
}
