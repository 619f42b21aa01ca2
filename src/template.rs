//! `{{…}}` text templates: the one syntax hooktrail uses wherever a user
//! writes text to be filled with event data — a source's synchronous
//! `response` body (ingest) and a CRM handler's `body_template`. Kept here,
//! apart from both, so the two cannot drift and neither imports the other.
//!
//! A template evaluates nothing: the caller looks each `{{key}}` up, the value
//! is escaped for the content type it lands in, and a key the caller does not
//! know is left as written, so a typo shows in the output instead of vanishing.

use serde_json::Value;

/// Replaces `{{key}}` using `lookup`; unknown keys are left as written.
pub fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    walk(template, |key, _| lookup(key))
}

/// Renders a body template of a given escaping, filling each `{{key}}` with
/// the JSON value `lookup` gives (`Value::Null` for a pointer that did not
/// resolve; `None` leaves an unknown key as written).
///
/// In a JSON body the place decides the form: inside a string literal the
/// value's text is escaped into it (`"{{/email}}"`); outside one the value is
/// inserted as a JSON value of its own: numbers, booleans, arrays and objects
/// as JSON, a string quoted, a missing value as `null`. So `{"n":{{/n}}}`
/// stays one valid document whatever the payload holds: a value of
/// `1,"a":2` becomes `{"n":"1,\"a\":2"}`, never a second key.
pub fn render_values(template: &str, escape: Escape, lookup: impl Fn(&str) -> Option<Value>) -> String {
    walk(template, |key, in_json_string| {
        let v = lookup(key)?;
        Some(if escape == Escape::Json && !in_json_string { v.to_string() } else { escape.apply(&value_text(Some(&v))) })
    })
}

/// The one scanner behind both renderers: copies literal text, asks `fill`
/// for each `{{key}}` (with whether it sits inside a JSON string literal of
/// the text so far), and leaves unknown or unclosed keys as written.
fn walk(template: &str, fill: impl Fn(&str, bool) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut quotes = JsonQuotes::default();
    while let Some(start) = rest.find("{{") {
        quotes.feed(&rest[..start]);
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let whole = &rest[start..start + 2 + end + 2];
                match fill(after[..end].trim(), quotes.in_string) {
                    Some(v) => out.push_str(&v),
                    None => {
                        quotes.feed(whole);
                        out.push_str(whole);
                    }
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// For a JSON content type, whether the template is one JSON document once
/// filled (every placeholder taken as a string, as a sender's text would be):
/// refused at `check-config` rather than answering senders with broken JSON.
pub fn check_json_template(template: &str, content_type: &str) -> Result<(), String> {
    let escape = Escape::for_content_type(content_type);
    if escape != Escape::Json {
        return Ok(());
    }
    let filled = render_values(template, escape, |_| Some(Value::String("x".into())));
    serde_json::from_str::<serde::de::IgnoredAny>(&filled)
        .map(|_| ())
        .map_err(|e| format!("is not a JSON document for content type `{content_type}` ({e}); write it as JSON, e.g. '{{\"id\":\"{{{{id}}}}\",\"n\":{{{{/n}}}}}}'"))
}

/// Tracks whether the literal text seen so far ends inside a JSON string.
#[derive(Default)]
struct JsonQuotes {
    in_string: bool,
    escaped: bool,
}

impl JsonQuotes {
    fn feed(&mut self, text: &str) {
        for b in text.bytes() {
            if self.escaped {
                self.escaped = false;
            } else if self.in_string && b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = !self.in_string;
            }
        }
    }
}

/// How a substituted value is escaped, so payload data cannot change the
/// structure around it: close a JSON string, open an XML tag, add a form field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// The inside of a JSON string (no surrounding quotes added).
    Json,
    /// XML and HTML text or attribute values.
    Markup,
    /// One `application/x-www-form-urlencoded` value.
    Form,
    /// Plain text: inserted as is.
    Verbatim,
}

impl Escape {
    /// The escaping a body of this `Content-Type` needs.
    pub fn for_content_type(content_type: &str) -> Self {
        let ct = content_type.to_ascii_lowercase();
        if ct.contains("json") {
            Escape::Json
        } else if ct.contains("xml") || ct.contains("html") {
            Escape::Markup
        } else if ct.contains("x-www-form-urlencoded") {
            Escape::Form
        } else {
            Escape::Verbatim
        }
    }

    /// `s` escaped for this context.
    pub fn apply(self, s: &str) -> String {
        match self {
            Escape::Json => {
                let quoted = Value::String(s.to_string()).to_string();
                quoted[1..quoted.len() - 1].to_string()
            }
            Escape::Markup => {
                s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
            }
            Escape::Form => serde_urlencoded::to_string([("", s)]).map(|e| e[1..].to_string()).unwrap_or_default(),
            Escape::Verbatim => s.to_string(),
        }
    }
}

/// The text a JSON value puts into a template: a string without its quotes,
/// nothing for null or a pointer that did not resolve, anything else as JSON.
pub fn value_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_unclosed_keys_are_left_as_written() {
        let out = render("a {{x}} b {{ y }} c {{open", |k| (k == "y").then(|| "Y".to_string()));
        assert_eq!(out, "a {{x}} b Y c {{open");
    }

    #[test]
    fn values_cannot_break_out_of_their_context() {
        assert_eq!(Escape::for_content_type("application/json; charset=utf-8").apply("a\"b\n"), "a\\\"b\\n");
        assert_eq!(Escape::for_content_type("text/xml").apply("<a href='x'>&"), "&lt;a href=&apos;x&apos;&gt;&amp;");
        assert_eq!(Escape::for_content_type("application/x-www-form-urlencoded").apply("a&b=c d"), "a%26b%3Dc+d");
        assert_eq!(Escape::for_content_type("text/plain").apply("a&b"), "a&b");
    }

    #[test]
    fn json_placeholders_outside_strings_become_values_and_the_document_stays_valid() {
        let payload = json!({"n": "1,\"a\":2", "k": 7, "o": {"x": [1]}, "t": true, "e": "a\"b"});
        let out = render_values(
            r#"{"n":{{/n}},"k":{{/k}},"o":{{/o}},"t":{{/t}},"m":{{/missing}},"s":"<{{/e}}>","id":{{id}},"u":{{x}}}"#,
            Escape::Json,
            |k| {
                if k == "id" {
                    Some(json!("evt_1"))
                } else if k.starts_with('/') {
                    Some(payload.pointer(k).cloned().unwrap_or(Value::Null))
                } else {
                    None
                }
            },
        );
        assert_eq!(out, r#"{"n":"1,\"a\":2","k":7,"o":{"x":[1]},"t":true,"m":null,"s":"<a\"b>","id":"evt_1","u":{{x}}}"#);
        // An escaped quote inside a literal does not end the string.
        let out = render_values(r#"{"a":"x\"{{/k}}","b":{{/k}}}"#, Escape::Json, |k| payload.pointer(k).cloned());
        assert_eq!(out, r#"{"a":"x\"7","b":7}"#);
        // Other content types insert the escaped text wherever it stands.
        assert_eq!(render_values("<n>{{/e}}</n>", Escape::Markup, |k| payload.pointer(k).cloned()), "<n>a&quot;b</n>");
    }

    #[test]
    fn value_text_drops_quotes_and_nulls() {
        assert_eq!(value_text(Some(&json!("x"))), "x");
        assert_eq!(value_text(Some(&json!(12))), "12");
        assert_eq!(value_text(Some(&json!(["a"]))), "[\"a\"]");
        assert_eq!(value_text(Some(&Value::Null)), "");
        assert_eq!(value_text(None), "");
    }
}
