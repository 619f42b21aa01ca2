//! Body decoding by content type, kept apart from transport: bytes in,
//! normalized JSON view out (SPEC §4). Pure functions, fuzzable.
//!
//! - JSON as sent (valid UTF-8, at most [`MAX_JSON_DEPTH`] levels).
//! - Form, multipart text fields and query strings: an object of strings, or
//!   arrays of strings when a key repeats. Bytes that are not UTF-8 after
//!   percent-decoding become U+FFFD: a lead is never refused for one bad byte.
//! - XML: `{"<root>": …}`, attributes as `"@name"`, repeated children as arrays,
//!   text-only elements as strings, mixed text under `"#text"`.

use serde_json::{Map, Value};

/// Deepest JSON nesting accepted.
pub const MAX_JSON_DEPTH: usize = 128;
/// Deepest XML nesting accepted (the same bound, for the same reason: stack).
pub const MAX_XML_DEPTH: usize = 128;

/// What a content type says the body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    Multipart { boundary: String },
    Xml,
    Other,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("JSON nests deeper than {MAX_JSON_DEPTH} levels")]
    JsonTooDeep,
    #[error("invalid multipart body: {0}")]
    Multipart(String),
    #[error("multipart/form-data needs a boundary parameter in Content-Type")]
    NoBoundary,
    #[error("invalid XML: {0}")]
    Xml(String),
    #[error("XML nests deeper than {MAX_XML_DEPTH} levels")]
    XmlTooDeep,
    #[error("empty body; send a {0} document")]
    Empty(&'static str),
}

/// Classifies a `Content-Type` header value. `None` when no type was sent.
pub fn classify(content_type: &str) -> BodyKind {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => BodyKind::Json,
        "application/x-www-form-urlencoded" => BodyKind::Form,
        "multipart/form-data" => match multer::parse_boundary(content_type) {
            Ok(boundary) => BodyKind::Multipart { boundary },
            Err(_) => BodyKind::Multipart { boundary: String::new() },
        },
        "application/xml" | "text/xml" => BodyKind::Xml,
        e if e.ends_with("+json") => BodyKind::Json,
        e if e.ends_with("+xml") => BodyKind::Xml,
        _ => BodyKind::Other,
    }
}

/// Validates JSON and returns its value.
pub fn json(body: &[u8]) -> Result<Value, DecodeError> {
    parse_json::<Value>(body)
}

/// Checks a body is valid JSON exactly as [`json`] does (same errors), without
/// building the value.
///
/// The common body takes a fast path: one byte scan (depth, and the two
/// things serde_json rejects only while decoding: `\u` escapes, which may be
/// lone surrogates, and numbers that may overflow an f64), a whole-body UTF-8
/// check, and serde_json skipping the document. Anything else, and every
/// failure, goes through the full decode, so errors are those of [`json`].
pub fn json_validate(body: &[u8]) -> Result<(), DecodeError> {
    let scan = scan_json(body);
    if !scan.risky && scan.depth <= MAX_JSON_DEPTH && std::str::from_utf8(body).is_ok() {
        let mut de = serde_json::Deserializer::from_slice(body);
        de.disable_recursion_limit();
        if <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut de).and_then(|_| de.end()).is_ok() {
            return Ok(());
        }
    }
    parse_json::<Validate>(body).map(|_| ())
}

/// Parses a whole body as one JSON document. Depth is checked by a linear scan
/// first, so serde_json's own guard (which stops at 127) can be lifted safely
/// and exactly 128 levels are accepted.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty("JSON"));
    }
    if scan_json(body).depth > MAX_JSON_DEPTH {
        return Err(DecodeError::JsonTooDeep);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    de.disable_recursion_limit();
    let v = T::deserialize(&mut de).map_err(|e| DecodeError::Json(e.to_string()))?;
    de.end().map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok(v)
}

/// A JSON value parsed and thrown away: strings are decoded (so bad UTF-8 and
/// bad escapes are caught, exactly as when building a `Value`) but borrowed,
/// and nothing is allocated for maps or arrays. `IgnoredAny` would be cheaper
/// still but skips strings unchecked.
struct Validate;

impl<'de> serde::Deserialize<'de> for Validate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Validate)
    }
}

impl<'de> serde::de::Visitor<'de> for Validate {
    type Value = Validate;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_str<E>(self, _: &str) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_unit<E>(self) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Validate, A::Error> {
        while seq.next_element::<Validate>()?.is_some() {}
        Ok(Validate)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Validate, A::Error> {
        while map.next_entry::<Validate, Validate>()?.is_some() {}
        Ok(Validate)
    }
}

/// What one linear pass over a would-be JSON document finds (it cannot
/// overflow the stack whatever the input).
struct JsonScan {
    /// Deepest nesting of brackets outside strings.
    depth: usize,
    /// A `\u` escape, a number with an exponent or a run of 300+ digits: what
    /// serde_json accepts when skipping but may reject when decoding.
    risky: bool,
}

fn scan_json(body: &[u8]) -> JsonScan {
    let (mut depth, mut deepest, mut digits) = (0usize, 0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    let mut risky = false;
    let mut prev = 0u8;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
                risky |= b == b'u';
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        if b.is_ascii_digit() {
            digits += 1;
            risky |= digits >= 300;
        } else {
            digits = 0;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'e' | b'E' => risky |= prev.is_ascii_digit() || prev == b'.',
            _ => {}
        }
        prev = b;
    }
    JsonScan { depth: deepest, risky }
}

/// Adds one field; a repeated key turns the value into an array. Values added
/// here are never arrays themselves (strings, or XML elements), so an array
/// found under the key always means "repeated".
pub(crate) fn push_field(map: &mut Map<String, Value>, key: String, value: Value) {
    match map.get_mut(&key) {
        None => {
            map.insert(key, value);
        }
        Some(Value::Array(list)) => list.push(value),
        Some(existing) => {
            let first = existing.take();
            *existing = Value::Array(vec![first, value]);
        }
    }
}

/// `a=1&b=2&a=3` → `{"a":["1","3"],"b":"2"}`. Lossy on bad UTF-8, never fails.
/// `skip` names a field left out (a query token must not reach handlers).
pub fn form(bytes: &[u8], skip: Option<&str>) -> Value {
    let mut map = Map::new();
    // serde_urlencoded decodes percent-escapes lossily, which is what we want.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).unwrap_or_default();
    for (k, v) in pairs {
        if skip == Some(k.as_str()) {
            continue;
        }
        push_field(&mut map, k, Value::String(v));
    }
    Value::Object(map)
}

/// Text fields of a multipart body; file parts are left out of the normalized
/// view (the raw body keeps them).
pub async fn multipart(body: bytes::Bytes, boundary: &str) -> Result<Value, DecodeError> {
    if boundary.is_empty() {
        return Err(DecodeError::NoBoundary);
    }
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut map = Map::new();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(DecodeError::Multipart(e.to_string())),
        };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some();
        let data = field.bytes().await.map_err(|e| DecodeError::Multipart(e.to_string()))?;
        if is_file {
            continue;
        }
        push_field(&mut map, name, Value::String(String::from_utf8_lossy(&data).into_owned()));
    }
    Ok(Value::Object(map))
}

/// XML to JSON per SPEC §4.
pub fn xml(body: &[u8]) -> Result<Value, DecodeError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    reader.config_mut().trim_text(true);
    // Open elements: (name, attributes+children, accumulated text).
    let mut stack: Vec<(String, Map<String, Value>, String)> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    let mut buf = Vec::new();
    let err = |e: &dyn std::fmt::Display, pos: u64| DecodeError::Xml(format!("{e} (at byte {pos})"));
    loop {
        let pos = reader.buffer_position();
        let event = reader.read_event_into(&mut buf).map_err(|e| err(&e, pos))?;
        match event {
            Event::Start(e) | Event::Empty(e) if root.is_some() && stack.is_empty() => {
                let _ = e;
                return Err(DecodeError::Xml("more than one root element".into()));
            }
            Event::Start(e) => {
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(DecodeError::XmlTooDeep);
                }
                let (name, attrs) = element_start(&e).map_err(|m| err(&m, pos))?;
                stack.push((name, attrs, String::new()));
            }
            Event::Empty(e) => {
                let (name, attrs) = element_start(&e).map_err(|m| err(&m, pos))?;
                let value = element_value(attrs, String::new());
                attach(&mut stack, &mut root, name, value);
            }
            Event::End(_) => {
                // quick-xml already checked the end tag matches.
                let (name, attrs, text) = stack.pop().ok_or_else(|| DecodeError::Xml("unexpected end tag".into()))?;
                attach(&mut stack, &mut root, name, element_value(attrs, text));
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| err(&e, pos))?;
                match stack.last_mut() {
                    Some(top) => top.2.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(DecodeError::Xml("text outside the root element".into())),
                }
            }
            Event::CData(c) => {
                let text = String::from_utf8_lossy(&c.into_inner()).into_owned();
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&text);
                }
            }
            Event::Eof => break,
            // Declarations, comments, processing instructions, doctype: not data.
            _ => {}
        }
        buf.clear();
    }
    if !stack.is_empty() {
        return Err(DecodeError::Xml(format!("unclosed element <{}>", stack.last().map(|s| s.0.as_str()).unwrap_or(""))));
    }
    match root {
        Some((name, value)) => {
            let mut m = Map::new();
            m.insert(name, value);
            Ok(Value::Object(m))
        }
        None => Err(DecodeError::Empty("XML")),
    }
}

fn element_start(e: &quick_xml::events::BytesStart<'_>) -> Result<(String, Map<String, Value>), String> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Map::new();
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let key = format!("@{}", String::from_utf8_lossy(a.key.as_ref()));
        let value = a.unescape_value().map_err(|e| e.to_string())?.into_owned();
        attrs.insert(key, Value::String(value));
    }
    Ok((name, attrs))
}

/// A finished element: a string when it holds only text, else an object.
fn element_value(mut fields: Map<String, Value>, text: String) -> Value {
    if fields.is_empty() {
        return Value::String(text);
    }
    if !text.is_empty() {
        fields.insert("#text".into(), Value::String(text));
    }
    Value::Object(fields)
}

fn attach(stack: &mut [(String, Map<String, Value>, String)], root: &mut Option<(String, Value)>, name: String, value: Value) {
    match stack.last_mut() {
        None => *root = Some((name, value)),
        Some((_, children, _)) => push_field(children, name, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_content_types() {
        assert_eq!(classify("application/json; charset=utf-8"), BodyKind::Json);
        assert_eq!(classify("application/vnd.api+json"), BodyKind::Json);
        assert_eq!(classify("Application/X-WWW-Form-Urlencoded"), BodyKind::Form);
        assert_eq!(classify("text/xml"), BodyKind::Xml);
        assert_eq!(classify("application/atom+xml"), BodyKind::Xml);
        assert_eq!(classify("multipart/form-data; boundary=abc"), BodyKind::Multipart { boundary: "abc".into() });
        assert_eq!(classify("text/plain"), BodyKind::Other);
    }

    #[test]
    fn json_depth_limit_is_128() {
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(json(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(json(deep.as_bytes()), Err(DecodeError::JsonTooDeep));
        // Brackets inside strings do not count.
        let s = format!("[\"{}\"]", "[".repeat(500));
        assert!(json(s.as_bytes()).is_ok());
    }

    #[test]
    fn validation_without_a_value_agrees_with_parsing() {
        for body in [&b"{\"a\": [1, 2, {\"b\": null}]}"[..], b"{\n \"a\": }", b"\"\xff\"", b"  ", b"[1] x", b"\"\\ud800\""] {
            assert_eq!(json(body).err(), json_validate(body).err(), "{}", String::from_utf8_lossy(body));
        }
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(json_validate(deep.as_bytes()), Err(DecodeError::JsonTooDeep));
        // What skipping accepts but decoding rejects, and near misses of it.
        let long = "9".repeat(400);
        let cases = [
            "1e400".to_string(),
            "[-1E400]".to_string(),
            "1E-400".to_string(),
            "{\"a\":1.5e308}".to_string(),
            "1.0e+".to_string(),
            long.clone(),
            format!("[{long}.5]"),
            format!("\"{long}\""),
            "\"\\ud800\"".to_string(),
            "\"\\ud83d\\ude00\"".to_string(),
            "\"\\u0041\"".to_string(),
            "{\"e\": true, \"E\": false, \"x\": \"1e400\"}".to_string(),
            "[01]".to_string(),
            "{\"a\" 1}".to_string(),
            "\"tab\there\"".to_string(),
            "\"bad \\q escape\"".to_string(),
        ];
        for body in &cases {
            assert_eq!(json(body.as_bytes()).err(), json_validate(body.as_bytes()).err(), "{body}");
        }
    }

    proptest::proptest! {
        /// The fast path never accepts what decoding rejects, and errors match.
        #[test]
        fn validation_agrees_with_parsing_on_any_input(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            proptest::prop_assert_eq!(json(&body).err(), json_validate(&body).err());
        }

        #[test]
        fn validation_agrees_with_parsing_on_json_like_input(body in "[\\[\\]{}\":,0-9eE.+\\- a-z\\\\]{0,48}") {
            proptest::prop_assert_eq!(json(body.as_bytes()).err(), json_validate(body.as_bytes()).err());
        }
    }

    #[test]
    fn json_errors_name_line_and_column() {
        let e = json(b"{\n \"a\": }").unwrap_err().to_string();
        assert!(e.contains("line 2 column 7"), "{e}");
        assert!(json(b"\"\xff\"").is_err());
    }

    #[test]
    fn form_repeats_become_arrays_and_bad_utf8_is_lossy() {
        let v = form(b"First_Name=Dan&Email=a%40b.c&tag=x&tag=y&bad=%FFok", None);
        assert_eq!(v, json!({"First_Name": "Dan", "Email": "a@b.c", "tag": ["x", "y"], "bad": "\u{FFFD}ok"}));
        assert_eq!(form(b"a=1&token=s", Some("token")), json!({"a": "1"}));
        assert_eq!(form(b"address=2040+Alameda+Padre+Serra", None), json!({"address": "2040 Alameda Padre Serra"}));
    }

    #[test]
    fn xml_maps_attributes_repeats_and_text() {
        let v = xml(br#"<?xml version="1.0"?><lead id="7"><name>Ann &amp; Bo</name><tag>a</tag><tag>b</tag><note lang="en">hi</note><empty/></lead>"#).unwrap();
        assert_eq!(
            v,
            json!({"lead": {"@id": "7", "name": "Ann & Bo", "tag": ["a", "b"], "note": {"@lang": "en", "#text": "hi"}, "empty": ""}})
        );
    }

    #[test]
    fn xml_rejects_garbage_and_depth() {
        assert!(xml(b"<a><b></a>").is_err());
        assert!(xml(b"").is_err());
        assert!(xml(b"<a/><b/>").is_err());
        let deep = format!("{}{}", "<a>".repeat(129), "</a>".repeat(129));
        assert_eq!(xml(deep.as_bytes()), Err(DecodeError::XmlTooDeep));
    }

    #[tokio::test]
    async fn multipart_text_fields() {
        let body = "--XX\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\na@b.c\r\n--XX\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\n\r\n\x01\x02\r\n--XX--\r\n";
        let v = multipart(bytes::Bytes::from(body), "XX").await.unwrap();
        assert_eq!(v, json!({"email": "a@b.c"}));
        assert!(multipart(bytes::Bytes::from("garbage"), "XX").await.is_err());
    }
}
