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
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let key = after[..end].trim();
                match lookup(key) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
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
    fn value_text_drops_quotes_and_nulls() {
        assert_eq!(value_text(Some(&json!("x"))), "x");
        assert_eq!(value_text(Some(&json!(12))), "12");
        assert_eq!(value_text(Some(&json!(["a"]))), "[\"a\"]");
        assert_eq!(value_text(Some(&Value::Null)), "");
        assert_eq!(value_text(None), "");
    }
}
