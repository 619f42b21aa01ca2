//! Body decoding by content type, kept apart from transport: bytes in,
//! normalized JSON view out (README "Receiving"). Pure functions, fuzzable,
//! and [`off_workers`], which decides where one runs.
//!
//! - JSON as sent (valid UTF-8, at most [`MAX_JSON_DEPTH`] levels).
//! - Form, multipart text fields and query strings: an object of strings, or
//!   arrays of strings when a key repeats. Bytes that are not UTF-8 after
//!   percent-decoding become U+FFFD: a lead is never refused for one bad byte.
//! - XML: `{"<root>": …}`, attributes as `"@name"`, repeated children as arrays,
//!   text-only elements as strings, mixed text under `"#text"`.
//!
//! Every decoder does work linear in the body (give or take a log factor for
//! map keys), whatever the body holds, and counts what it builds against the
//! limits below before building it: a hostile body costs about what a friendly
//! one of the same size costs, and no more memory than its limit allows.
//! Large bodies are decoded off the async workers ([`off_workers`]).

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use tokio::sync::Semaphore;

/// Deepest JSON nesting accepted.
pub const MAX_JSON_DEPTH: usize = 128;
/// Deepest XML nesting accepted (the same bound, for the same reason: stack).
pub const MAX_XML_DEPTH: usize = 128;
/// Attributes one XML element may carry. Real documents carry a handful; a
/// thousand leaves room for generated ones and bounds what one tag costs.
pub const MAX_XML_ATTRIBUTES: usize = 1_000;
/// Values the normalized view of a JSON or XML body may hold (JSON: every
/// object, array, string, number, boolean and null, keys not counted; XML:
/// every element and attribute). Each costs 50 to 150 bytes of memory in the
/// view, so this bounds a view at a few MB whatever `max_body_bytes` is, and
/// leaves room for batches (100,000 contact ids are about 900 KB of JSON).
pub const MAX_VALUES: usize = 100_000;
/// Fields of a form body or query string, and parts of a multipart body. A
/// form a person or a platform fills in has dozens; each field costs about
/// 150 bytes in the view.
pub const MAX_FIELDS: usize = 10_000;
/// Bodies up to this size are decoded inline on the async worker; larger ones
/// on the blocking pool, see [`off_workers`]. A webhook of a few KB decodes in
/// microseconds, less than the trip to the pool costs; the costliest 16 KiB
/// body known takes well under a millisecond (BENCHMARKS.md "Decode cost"),
/// about what one request may hold a worker for.
pub const INLINE_DECODE_BYTES: usize = 16 * 1024;

/// What a content type says the body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    Multipart { boundary: String },
    Xml,
    Other,
}

/// Why a body could not be decoded; the message goes back to the sender as is,
/// saying what is wrong and where (a line and column, an element or field name).
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
    #[error("JSON body has more than {MAX_VALUES} values")]
    JsonTooManyValues,
    #[error("XML element `{0}` has more than {MAX_XML_ATTRIBUTES} attributes")]
    XmlTooManyAttributes(String),
    #[error("XML body has more than {MAX_VALUES} elements and attributes")]
    XmlTooManyValues,
    /// `{0}`: "form body has", "query string has".
    #[error("{0} more than {MAX_FIELDS} fields")]
    TooManyFields(&'static str),
    #[error("multipart body has more than {MAX_FIELDS} parts")]
    TooManyParts,
    #[error("decoding was interrupted: shutting down")]
    Interrupted,
}

impl DecodeError {
    /// Whether the body was refused for its size (a count over a limit,
    /// answered 413) rather than for its form (400).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            DecodeError::JsonTooManyValues
                | DecodeError::XmlTooManyAttributes(_)
                | DecodeError::XmlTooManyValues
                | DecodeError::TooManyFields(_)
                | DecodeError::TooManyParts
        )
    }
}

/// Runs `decode` (of a body of `len` bytes) where it cannot stall other
/// requests: inline up to [`INLINE_DECODE_BYTES`], else on tokio's blocking
/// pool, at most one such decode per CPU at a time. The async workers keep
/// serving every other sender meanwhile, and however many large bodies
/// arrive at once, they wait their turn (holding only their bytes) instead
/// of each taking a thread and a share of the CPU.
pub async fn off_workers<T: Send + 'static>(
    len: usize,
    decode: impl FnOnce() -> Result<T, DecodeError> + Send + 'static,
) -> Result<T, DecodeError> {
    if len <= INLINE_DECODE_BYTES {
        return decode();
    }
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))));
    let permit = slots.clone().acquire_owned().await.map_err(|_| DecodeError::Interrupted)?;
    // The permit moves into the task: a request dropped mid-decode still
    // holds its slot until the decode really ends.
    let task = tokio::task::spawn_blocking(move || {
        let out = decode();
        drop(permit);
        out
    });
    match task.await {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(DecodeError::Interrupted),
    }
}

/// A name from the body, cut to a length fit for an error message.
fn short(name: &str) -> String {
    const MAX: usize = 64;
    match name.char_indices().nth(MAX) {
        None => name.to_string(),
        Some((at, _)) => format!("{}…", &name[..at]),
    }
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
/// The common body takes a fast path: one byte scan (depth, values, and the
/// two things serde_json rejects only while decoding: `\u` escapes, which may
/// be lone surrogates, and numbers that may overflow an f64), a whole-body
/// UTF-8 check, and serde_json skipping the document. Anything else, and every
/// failure, goes through the full decode, so errors are those of [`json`].
pub fn json_validate(body: &[u8]) -> Result<(), DecodeError> {
    let scan = scan_json(body);
    if !scan.risky && scan.depth <= MAX_JSON_DEPTH && scan.values <= MAX_VALUES && std::str::from_utf8(body).is_ok() {
        let mut de = serde_json::Deserializer::from_slice(body);
        de.disable_recursion_limit();
        if <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut de).and_then(|_| de.end()).is_ok() {
            return Ok(());
        }
    }
    parse_json::<Validate>(body).map(|_| ())
}

/// Parses a whole body as one JSON document. Depth and values are counted by
/// a linear scan first, so nothing is built for a body over the limits, and
/// serde_json's own depth guard (which stops at 127) can be lifted safely:
/// exactly 128 levels are accepted.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty("JSON"));
    }
    let scan = scan_json(body);
    if scan.depth > MAX_JSON_DEPTH {
        return Err(DecodeError::JsonTooDeep);
    }
    if scan.values > MAX_VALUES {
        return Err(DecodeError::JsonTooManyValues);
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
    /// Values in the document, if it is valid: the root, plus one per item
    /// or member of each non-empty array or object, which is one more than
    /// the commas inside it.
    values: usize,
}

fn scan_json(body: &[u8]) -> JsonScan {
    let (mut depth, mut deepest, mut digits) = (0usize, 0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    let mut risky = false;
    let mut prev = 0u8;
    let mut values = 1usize;
    // The last byte that was not whitespace opened an array or object.
    let mut opened = false;
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
        if opened && !b.is_ascii_whitespace() {
            opened = false;
            values += usize::from(b != b']' && b != b'}');
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
                opened = true;
            }
            b',' => values += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'e' | b'E' => risky |= prev.is_ascii_digit() || prev == b'.',
            _ => {}
        }
        prev = b;
    }
    JsonScan { depth: deepest, risky, values }
}

/// Adds one field; a repeated key turns the value into an array. Values added
/// here are never arrays themselves (strings, or XML elements), so an array
/// found under the key always means "repeated".
pub(crate) fn push_field(map: &mut Map<String, Value>, key: String, value: Value) {
    use serde_json::map::Entry;
    match map.entry(key) {
        Entry::Vacant(v) => {
            v.insert(value);
        }
        Entry::Occupied(mut o) => match o.get_mut() {
            Value::Array(list) => list.push(value),
            existing => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        },
    }
}

/// `a=1&b=2&a=3` → `{"a":["1","3"],"b":"2"}`. Lossy on bad UTF-8; refused
/// only above [`MAX_FIELDS`] fields, counted before anything is decoded.
pub fn form(bytes: &[u8]) -> Result<Value, DecodeError> {
    fields(bytes, None, "form body has")
}

/// The fields of a query string (a ping URL), as for [`form`]. `skip` names a
/// field left out (a query token must not reach handlers).
pub fn query(query: &str, skip: Option<&str>) -> Result<Value, DecodeError> {
    fields(query.as_bytes(), skip, "query string has")
}

fn fields(bytes: &[u8], skip: Option<&str>, what: &'static str) -> Result<Value, DecodeError> {
    // Pairs are what `form_urlencoded` (under serde_urlencoded) yields: the
    // non-empty runs between `&`s.
    if bytes.split(|&b| b == b'&').filter(|pair| !pair.is_empty()).nth(MAX_FIELDS).is_some() {
        return Err(DecodeError::TooManyFields(what));
    }
    let mut map = Map::new();
    // serde_urlencoded decodes percent-escapes lossily, which is what we want.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).unwrap_or_default();
    for (k, v) in pairs {
        if skip == Some(k.as_str()) {
            continue;
        }
        push_field(&mut map, k, Value::String(v));
    }
    Ok(Value::Object(map))
}

/// Text fields of a multipart body; file parts are left out of the normalized
/// view (the raw body keeps them). At most [`MAX_FIELDS`] parts, files included.
///
/// multer is asynchronous, but the whole body is already here, so nothing it
/// awaits can be pending: it is polled to the end at once, which lets this
/// run on the blocking pool like the other decoders.
pub fn multipart(body: bytes::Bytes, boundary: &str) -> Result<Value, DecodeError> {
    use futures_util::FutureExt as _;
    if boundary.is_empty() {
        return Err(DecodeError::NoBoundary);
    }
    let stream = futures_util::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(body)));
    let mut mp = multer::Multipart::new(stream, boundary);
    let fields = async move {
        let mut map = Map::new();
        let mut parts = 0usize;
        while let Some(field) = mp.next_field().await.map_err(|e| DecodeError::Multipart(e.to_string()))? {
            parts += 1;
            if parts > MAX_FIELDS {
                return Err(DecodeError::TooManyParts);
            }
            let name = field.name().unwrap_or("").to_string();
            let is_file = field.file_name().is_some();
            let data = field.bytes().await.map_err(|e| DecodeError::Multipart(e.to_string()))?;
            if !is_file {
                push_field(&mut map, name, Value::String(String::from_utf8_lossy(&data).into_owned()));
            }
        }
        Ok(Value::Object(map))
    };
    fields.now_or_never().unwrap_or_else(|| Err(DecodeError::Multipart("the body ended early".into())))
}

/// XML to JSON (README "Receiving"). Stops at the first limit crossed
/// ([`MAX_XML_DEPTH`], [`MAX_XML_ATTRIBUTES`], [`MAX_VALUES`]), so what it
/// holds never exceeds them.
pub fn xml(body: &[u8]) -> Result<Value, DecodeError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    reader.config_mut().trim_text(true);
    // Open elements: (name, attributes+children, accumulated text).
    let mut stack: Vec<(String, Map<String, Value>, String)> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    // Elements and attributes so far.
    let mut values = 0usize;
    let err = |e: &dyn std::fmt::Display, pos: u64| DecodeError::Xml(format!("{e} (at byte {pos})"));
    loop {
        let pos = reader.buffer_position();
        let event = reader.read_event().map_err(|e| err(&e, pos))?;
        match event {
            Event::Start(e) | Event::Empty(e) if root.is_some() && stack.is_empty() => {
                let _ = e;
                return Err(DecodeError::Xml("more than one root element".into()));
            }
            Event::Start(e) => {
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(DecodeError::XmlTooDeep);
                }
                let (name, attrs) = element_start(&e, &mut values, pos)?;
                stack.push((name, attrs, String::new()));
            }
            Event::Empty(e) => {
                let (name, attrs) = element_start(&e, &mut values, pos)?;
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
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&String::from_utf8_lossy(&c));
                }
            }
            Event::Eof => break,
            // Declarations, comments, processing instructions, doctype: not data.
            _ => {}
        }
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

/// An element's name and attributes, counted into `values`.
///
/// quick-xml's own duplicate-attribute check compares each attribute with
/// every earlier one, which is quadratic in the attributes of a tag (80,000
/// of them cost 17 s of CPU); it is off, and the map the attributes go into
/// finds a repeat in O(log n) instead.
fn element_start(e: &quick_xml::events::BytesStart<'_>, values: &mut usize, pos: u64) -> Result<(String, Map<String, Value>), DecodeError> {
    use serde_json::map::Entry;
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    *values += 1;
    if *values > MAX_VALUES {
        return Err(DecodeError::XmlTooManyValues);
    }
    let mut attrs = Map::new();
    let mut attributes = e.attributes();
    attributes.with_checks(false);
    for a in attributes {
        let a = a.map_err(|e| DecodeError::Xml(format!("{e} (in the tag at byte {pos})")))?;
        if attrs.len() == MAX_XML_ATTRIBUTES {
            return Err(DecodeError::XmlTooManyAttributes(short(&name)));
        }
        *values += 1;
        if *values > MAX_VALUES {
            return Err(DecodeError::XmlTooManyValues);
        }
        let key = format!("@{}", String::from_utf8_lossy(a.key.as_ref()));
        match attrs.entry(key) {
            Entry::Occupied(o) => {
                let msg = format!("element `{}` repeats attribute `{}` (in the tag at byte {pos})", short(&name), short(&o.key()[1..]));
                return Err(DecodeError::Xml(msg));
            }
            Entry::Vacant(v) => {
                let value = a.unescape_value().map_err(|e| DecodeError::Xml(format!("{e} (in the tag at byte {pos})")))?;
                v.insert(Value::String(value.into_owned()));
            }
        }
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
        let v = form(b"First_Name=Dan&Email=a%40b.c&tag=x&tag=y&bad=%FFok").unwrap();
        assert_eq!(v, json!({"First_Name": "Dan", "Email": "a@b.c", "tag": ["x", "y"], "bad": "\u{FFFD}ok"}));
        assert_eq!(query("a=1&token=s", Some("token")).unwrap(), json!({"a": "1"}));
        assert_eq!(form(b"address=2040+Alameda+Padre+Serra").unwrap(), json!({"address": "2040 Alameda Padre Serra"}));
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

    #[test]
    fn multipart_text_fields() {
        let body = "--XX\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\na@b.c\r\n--XX\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\n\r\n\x01\x02\r\n--XX--\r\n";
        let v = multipart(bytes::Bytes::from(body), "XX").unwrap();
        assert_eq!(v, json!({"email": "a@b.c"}));
        assert!(multipart(bytes::Bytes::from("garbage"), "XX").is_err());
    }

    // ---- Limits and linear work (issue 11) ----

    /// The costliest bodies per byte we know of, `n` units long.
    mod worst {
        pub fn xml_attributes(elements: usize, attributes: usize) -> Vec<u8> {
            let mut s = String::from("<r>");
            for _ in 0..elements {
                s.push_str("<e");
                for i in 0..attributes {
                    s.push_str(&format!(" a{i}=\"1\""));
                }
                s.push_str("/>");
            }
            s.push_str("</r>");
            s.into_bytes()
        }
        pub fn xml_elements(n: usize) -> Vec<u8> {
            format!("<r>{}</r>", "<a/>".repeat(n)).into_bytes()
        }
        pub fn json_members(n: usize) -> Vec<u8> {
            let members: Vec<String> = (0..n).map(|i| format!("\"{i}\":0")).collect();
            format!("{{{}}}", members.join(",")).into_bytes()
        }
        pub fn json_items(n: usize) -> Vec<u8> {
            format!("[{}]", vec!["0"; n].join(",")).into_bytes()
        }
        pub fn form_fields(n: usize) -> Vec<u8> {
            (0..n).map(|i| format!("{i}=")).collect::<Vec<_>>().join("&").into_bytes()
        }
        pub fn multipart_parts(n: usize) -> Vec<u8> {
            let part = |i: usize| format!("--B\r\nContent-Disposition: form-data; name=\"{i}\"\r\n\r\n\r\n");
            let mut s: String = (0..n).map(part).collect();
            s.push_str("--B--\r\n");
            s.into_bytes()
        }
    }

    #[test]
    fn xml_allows_1000_attributes_per_element_and_refuses_1001() {
        let v = xml(&worst::xml_attributes(1, MAX_XML_ATTRIBUTES)).unwrap();
        assert_eq!(v["r"]["e"].as_object().map(Map::len), Some(1000));
        let e = xml(&worst::xml_attributes(1, MAX_XML_ATTRIBUTES + 1)).unwrap_err();
        assert_eq!(e, DecodeError::XmlTooManyAttributes("e".into()));
        assert_eq!(e.to_string(), "XML element `e` has more than 1000 attributes");
        assert!(e.is_too_large());
        // The reported reproduction: 80,000 attributes on one element.
        let e = xml(&worst::xml_attributes(1, 80_000)).unwrap_err();
        assert_eq!(e, DecodeError::XmlTooManyAttributes("e".into()));
        // A hostile element name is cut short in the message.
        let body = format!("<{} {}/>", "n".repeat(5000), (0..1001).map(|i| format!("a{i}=''")).collect::<Vec<_>>().join(" "));
        assert!(xml(body.as_bytes()).unwrap_err().to_string().len() < 200);
    }

    /// quick-xml's own duplicate check compares every attribute with every
    /// earlier one (quadratic); it must stay off. Were it on, its error
    /// ("duplicated attribute") would be the one reported here.
    #[test]
    fn xml_repeated_attribute_is_found_by_a_map_lookup_not_quick_xmls_pairwise_check() {
        let e = xml(br#"<lead><p id="1" x="2" id="3"/></lead>"#).unwrap_err();
        assert_eq!(e, DecodeError::Xml("element `p` repeats attribute `id` (in the tag at byte 6)".into()), "{e}");
        assert!(!e.is_too_large());
        // Prefixed names are distinct names.
        assert!(xml(br#"<r a="1" x:a="2"/>"#).is_ok());
    }

    #[test]
    fn xml_holds_at_most_100000_elements_and_attributes() {
        // The root and 99,999 children.
        let v = xml(&worst::xml_elements(MAX_VALUES - 1)).unwrap();
        assert_eq!(v["r"]["a"].as_array().map(Vec::len), Some(MAX_VALUES - 1));
        let e = xml(&worst::xml_elements(MAX_VALUES)).unwrap_err();
        assert_eq!(e, DecodeError::XmlTooManyValues);
        assert_eq!(e.to_string(), "XML body has more than 100000 elements and attributes");
        // Attributes count too: root + 99 × (element + 1000 attributes) = 99,100;
        // one more element with 1000 attributes crosses the limit.
        assert!(xml(&worst::xml_attributes(99, 1000)).is_ok());
        assert_eq!(xml(&worst::xml_attributes(100, 1000)), Err(DecodeError::XmlTooManyValues));
    }

    /// The reference count of values: every value serde_json visits (object
    /// keys are not values; a repeated key's values all count).
    fn count_values(body: &[u8]) -> usize {
        struct Count(usize);
        impl<'de> serde::de::DeserializeSeed<'de> for &mut Count {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                self.0 += 1;
                d.deserialize_any(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for &mut Count {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
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
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(&mut *self)?.is_some() {}
                Ok(())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
                    map.next_value_seed(&mut *self)?;
                }
                Ok(())
            }
        }
        let mut count = Count(0);
        let mut de = serde_json::Deserializer::from_slice(body);
        de.disable_recursion_limit();
        serde::de::DeserializeSeed::deserialize(&mut count, &mut de).expect("valid JSON");
        count.0
    }

    #[test]
    fn json_values_are_counted_exactly_by_the_scan() {
        for body in [
            "0",
            " [ ] ",
            "{}",
            "[[],{},[[]]]",
            "{\"a\": [1, 2, {\"b\": null}], \"c\": \"x,y[{\"}",
            "[ \n 1 , \"\\\",[\" , { } ]",
            "{\"a\":1,\"a\":2}",
        ] {
            assert_eq!(scan_json(body.as_bytes()).values, count_values(body.as_bytes()), "{body}");
        }
    }

    proptest::proptest! {
        #[test]
        fn json_value_count_agrees_with_serde_on_any_valid_document(body in "[\\[\\]{}\":,0-9 a\\\\]{0,48}") {
            if json(body.as_bytes()).is_ok() {
                proptest::prop_assert_eq!(scan_json(body.as_bytes()).values, count_values(body.as_bytes()));
            }
        }
    }

    #[test]
    fn json_holds_at_most_100000_values_whether_or_not_it_is_built() {
        // An array of n items is n + 1 values.
        let ok = worst::json_items(MAX_VALUES - 1);
        assert!(json(&ok).is_ok());
        assert_eq!(json_validate(&ok), Ok(()));
        let over = worst::json_items(MAX_VALUES);
        assert_eq!(json(&over), Err(DecodeError::JsonTooManyValues));
        assert_eq!(json_validate(&over), Err(DecodeError::JsonTooManyValues));
        assert_eq!(json_validate(&over).unwrap_err().to_string(), "JSON body has more than 100000 values");
        assert_eq!(json(&worst::json_members(MAX_VALUES)), Err(DecodeError::JsonTooManyValues));
        // Commas in strings are text.
        let text = format!("[\"{}\"]", ",".repeat(2 * MAX_VALUES));
        assert!(json(text.as_bytes()).is_ok());
    }

    #[test]
    fn forms_and_query_strings_hold_at_most_10000_fields() {
        assert_eq!(form(&worst::form_fields(MAX_FIELDS)).unwrap().as_object().map(Map::len), Some(MAX_FIELDS));
        let e = form(&worst::form_fields(MAX_FIELDS + 1)).unwrap_err();
        assert_eq!(e.to_string(), "form body has more than 10000 fields");
        assert!(e.is_too_large());
        // Empty runs between `&`s are not fields (the decoder skips them too).
        let mut sparse = worst::form_fields(MAX_FIELDS);
        sparse.extend_from_slice(&b"&".repeat(50_000));
        assert!(form(&sparse).is_ok());
        let q = String::from_utf8(worst::form_fields(MAX_FIELDS + 1)).unwrap();
        assert_eq!(query(&q, None).unwrap_err().to_string(), "query string has more than 10000 fields");
    }

    #[test]
    fn multipart_holds_at_most_10000_parts() {
        let v = multipart(worst::multipart_parts(MAX_FIELDS).into(), "B").unwrap();
        assert_eq!(v.as_object().map(Map::len), Some(MAX_FIELDS));
        let e = multipart(worst::multipart_parts(MAX_FIELDS + 1).into(), "B").unwrap_err();
        assert_eq!(e, DecodeError::TooManyParts);
        assert_eq!(e.to_string(), "multipart body has more than 10000 parts");
    }

    /// Counts this thread's allocations: the work-count behind the linearity
    /// test below (deterministic, unlike a clock). This is the allocator of
    /// the whole unit-test binary; it only adds counting to the system's.
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        #[derive(Clone, Copy, Debug, Default)]
        pub struct Counts {
            /// Allocations and reallocations.
            pub allocs: u64,
            /// Bytes asked for, reallocations included.
            pub bytes: u64,
            live: i64,
            /// Most bytes held at once.
            pub peak: i64,
        }

        thread_local! {
            static COUNTS: Cell<Counts> = const { Cell::new(Counts { allocs: 0, bytes: 0, live: 0, peak: 0 }) };
        }

        fn note(f: impl FnOnce(&mut Counts)) {
            // Not available while the thread is being torn down: not counted then.
            let _ = COUNTS.try_with(|c| {
                let mut v = c.get();
                f(&mut v);
                v.peak = v.peak.max(v.live);
                c.set(v);
            });
        }

        pub struct Counting;

        // SAFETY: every call is passed on to `System` unchanged; counting touches
        // only a const-initialized thread-local `Cell`, which never allocates.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(|c| {
                    c.allocs += 1;
                    c.bytes += layout.size() as u64;
                    c.live += layout.size() as i64;
                });
                System.alloc(layout)
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(|c| {
                    c.allocs += 1;
                    c.bytes += layout.size() as u64;
                    c.live += layout.size() as i64;
                });
                System.alloc_zeroed(layout)
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                note(|c| c.live -= layout.size() as i64);
                System.dealloc(ptr, layout)
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(|c| {
                    c.allocs += 1;
                    c.bytes += new_size as u64;
                    c.live += new_size as i64 - layout.size() as i64;
                });
                System.realloc(ptr, layout, new_size)
            }
        }

        #[global_allocator]
        static ALLOCATOR: Counting = Counting;

        /// What `f` allocated on this thread; `peak` is above what was held before.
        pub fn measure(f: impl FnOnce()) -> Counts {
            let start = COUNTS.with(|c| {
                let mut v = c.get();
                v.peak = v.live;
                c.set(v);
                v
            });
            f();
            let end = COUNTS.with(Cell::get);
            Counts { allocs: end.allocs - start.allocs, bytes: end.bytes - start.bytes, live: 0, peak: end.peak - start.live }
        }
    }

    /// Work that grows faster than the body shows as allocations: n and 2n
    /// units of the costliest body of each kind must cost at most about twice
    /// as many allocations and bytes, and what the view holds at its peak is
    /// a bounded multiple of the body.
    #[test]
    fn decoding_work_and_memory_grow_linearly_with_the_body() {
        type Make = fn(usize) -> Vec<u8>;
        type Decode = fn(&[u8]) -> Result<Value, DecodeError>;
        let cases: [(&str, Make, Decode, usize); 6] = [
            ("attributes of one XML element", |n| worst::xml_attributes(1, n), xml, 400),
            ("XML elements", worst::xml_elements, xml, 20_000),
            ("JSON members", worst::json_members, json, 20_000),
            ("JSON items", worst::json_items, json, 40_000),
            ("form fields", worst::form_fields, form, 4_000),
            ("multipart parts", worst::multipart_parts, |b| multipart(bytes::Bytes::copy_from_slice(b), "B"), 4_000),
        ];
        for (what, make, decode, n) in cases {
            let (small, large) = (make(n), make(2 * n));
            let cost = |body: &[u8]| {
                counting::measure(|| {
                    let view = decode(body).expect("under the limits");
                    // As the listener stores it.
                    std::hint::black_box(view.to_string());
                })
            };
            let (a, b) = (cost(&small), cost(&large));
            eprintln!("{what}: {n} → {a:?}, {} → {b:?}", 2 * n);
            assert!(b.allocs <= 2 * a.allocs + 64, "{what}: {} allocations for {n}, {} for {}", a.allocs, b.allocs, 2 * n);
            assert!(b.bytes <= 2 * a.bytes + a.bytes / 4, "{what}: {} bytes allocated for {n}, {} for {}", a.bytes, b.bytes, 2 * n);
            let per_byte = b.peak as f64 / large.len() as f64;
            assert!(per_byte < 40.0, "{what}: the view holds {per_byte:.1} bytes per body byte");
        }
    }

    /// CPU time of this thread (not wall time: other processes do not count).
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec we own.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime failed");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Prints the decode CPU per 100 KB of the costliest bodies we know, for
    /// BENCHMARKS.md ("Decode cost"). A measurement, not a test:
    /// `cargo test --release --lib decode_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement; run in release with --ignored --nocapture"]
    fn decode_cost_per_100_kb_of_the_worst_bodies() {
        const MIB: usize = 1 << 20;
        // `unit` (with `{n}` replaced by the index) at most `units` times
        // between head and tail, up to 1 MiB in all.
        let fill_n = |head: &str, unit: &str, tail: &str, units: usize| {
            let (max, mut s) = (MIB, String::from(head));
            for n in 0..units {
                let u = unit.replace("{n}", &n.to_string());
                if s.len() + u.len() + tail.len() > max {
                    break;
                }
                s.push_str(&u);
            }
            s.push_str(tail);
            s.into_bytes()
        };
        let fill = |head: &str, unit: &str, tail: &str| fill_n(head, unit, tail, usize::MAX);
        type Case = (&'static str, &'static str, Vec<u8>);
        let cases: Vec<Case> = vec![
            ("json", "bench/payload.json, a typical webhook", include_bytes!("../../bench/payload.json").to_vec()),
            ("json", "99,999 zeros `[0,0,…]`", worst::json_items(MAX_VALUES - 1)),
            ("json", "90,000 members `{\"0\":0,…}`", fill_n("{\"x\":0", ",\"{n}\":0", "}", 90_000)),
            ("json", "`[{},{},…]` to 1 MiB (refused)", fill("[{}", ",{}", "]")),
            ("json", "zeros to 1 MiB (refused)", fill("[0", ",0", "]")),
            ("json", "one string of `\\u00e9` escapes, 1 MiB", fill("[\"", "\\u00e9", "\"]")),
            ("json", "128-deep arrays, repeated to 1 MiB", fill("[", &format!("{}{},", "[".repeat(127), "]".repeat(127)), "0]")),
            ("form", "2,700 fields `0=&1=&…`, about the most decoded inline", worst::form_fields(2_700)),
            ("form", "10,000 fields `0=&1=&…`", worst::form_fields(MAX_FIELDS)),
            ("form", "one value of `%FF` escapes, 1 MiB", fill("a=", "%FF", "")),
            ("form", "10,000 fields of `%41+` to 1 MiB", fill_n("", &format!("{{n}}={}&", "%41+".repeat(24)), "", MAX_FIELDS)),
            ("form", "`a&a&…` to 1 MiB (refused)", fill("", "a&", "")),
            ("multipart", "10,000 empty parts", worst::multipart_parts(MAX_FIELDS)),
            (
                "multipart",
                "one part of `\\r\\n--` false boundaries, 1 MiB",
                fill("--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n", "\r\n--", "\r\n--B--\r\n"),
            ),
            (
                "multipart",
                "parts to 1 MiB (refused)",
                fill("", "--B\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n\r\n", "--B--\r\n"),
            ),
            ("xml", "99 elements of 1000 attributes", worst::xml_attributes(99, MAX_XML_ATTRIBUTES)),
            ("xml", "99,999 `<a/>`", worst::xml_elements(MAX_VALUES - 1)),
            ("xml", "80,000 attributes on one element (refused)", worst::xml_attributes(1, 80_000)),
            ("xml", "text of `&amp;` to 1 MiB", fill("<r>", "&amp;", "</r>")),
            ("xml", "128-deep elements, repeated to 1 MiB", fill("<r>", &format!("{}{}", "<a>".repeat(127), "</a>".repeat(127)), "</r>")),
            ("xml", "`<a/>` to 1 MiB (refused)", fill("<r>", "<a/>", "</r>")),
        ];
        println!("| kind | body | bytes | µs | µs per 100 KB |\n|---|---|---:|---:|---:|");
        let row = |kind: &str, what: &str, len: usize, run: &dyn Fn() -> Result<(), DecodeError>| {
            let (mut best, mut outcome) = (std::time::Duration::MAX, String::new());
            for _ in 0..5 {
                let start = thread_cpu();
                let r = run();
                best = best.min(thread_cpu() - start);
                outcome = r.err().map_or("ok".into(), |e| e.to_string());
            }
            let us = best.as_secs_f64() * 1e6;
            println!("| {kind} | {what} ({outcome}) | {len} | {us:.0} | {:.0} |", us * 100_000.0 / len as f64);
        };
        for (kind, what, body) in cases {
            let bytes = bytes::Bytes::from(body);
            // As the listener does: a JSON body is stored as sent, the others'
            // views serialized for storage.
            let view = |v: Value| drop(std::hint::black_box(v.to_string()));
            match kind {
                "json" => {
                    row(kind, what, bytes.len(), &|| json(&bytes).map(drop));
                    row("json (validate only)", what, bytes.len(), &|| json_validate(&bytes));
                }
                "form" => row(kind, what, bytes.len(), &|| form(&bytes).map(view)),
                "multipart" => row(kind, what, bytes.len(), &|| multipart(bytes.clone(), "B").map(view)),
                _ => row(kind, what, bytes.len(), &|| xml(&bytes).map(view)),
            }
        }
    }
}
