//! Form bodies and query strings (`decode::form`, `ingest::redact_query`) on
//! arbitrary bytes: never fail or panic, always give an object of strings or
//! string arrays, never pass on the skipped token field, and redaction keeps
//! the token parameter's value out of what is stored.
#![no_main]

use hooktrail::ingest::{decode, redact_query};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let v = decode::form(data, Some("token"));
    let Value::Object(map) = &v else { panic!("form() gave a non-object: {v}") };
    assert!(!map.contains_key("token"), "the skipped field reached the payload");
    for value in map.values() {
        match value {
            Value::String(_) => {}
            Value::Array(items) => assert!(items.len() >= 2 && items.iter().all(Value::is_string)),
            other => panic!("form() produced {other}"),
        }
    }
    // A query string is text; hyper hands us `&str`.
    if let Ok(q) = std::str::from_utf8(data) {
        let redacted = redact_query(q, Some("token"));
        // Decoding what we store never yields the token's value under its name.
        let stored = decode::form(redacted.as_bytes(), None);
        if let Some(t) = stored.get("token") {
            let ok = |s: &Value| s.as_str().is_some_and(|s| s == "[redacted]");
            match t {
                Value::Array(items) => assert!(items.iter().all(ok), "unredacted token in {redacted:?}"),
                one => assert!(ok(one), "unredacted token in {redacted:?}"),
            }
        }
    }
});
