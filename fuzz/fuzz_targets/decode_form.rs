//! Form bodies and query strings (`decode::form`, `decode::query`,
//! `ingest::redact_query`) on arbitrary bytes: never panic, fail only over
//! the field limit, always give an object of strings or string arrays, never
//! pass on the skipped token field, and redaction keeps the token
//! parameter's value out of what is stored.
#![no_main]

use hooktrail::ingest::{decode, redact_query};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check_fields(v: &Value) {
    let Value::Object(map) = v else { panic!("form() gave a non-object: {v}") };
    for value in map.values() {
        match value {
            Value::String(_) => {}
            Value::Array(items) => assert!(items.len() >= 2 && items.iter().all(Value::is_string)),
            other => panic!("form() produced {other}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match decode::form(data) {
        Ok(v) => check_fields(&v),
        Err(e) => assert!(e.is_too_large(), "form() failed other than on the field limit: {e}"),
    }
    // A query string is text; hyper hands us `&str`.
    if let Ok(q) = std::str::from_utf8(data) {
        if let Ok(v) = decode::query(q, Some("token")) {
            check_fields(&v);
            assert!(v.get("token").is_none(), "the skipped field reached the payload");
        }
        let redacted = redact_query(q, Some("token"));
        // Decoding what we store never yields the token's value under its name.
        let Ok(stored) = decode::query(&redacted, None) else { return };
        if let Some(t) = stored.get("token") {
            let ok = |s: &Value| s.as_str().is_some_and(|s| s == "[redacted]");
            match t {
                Value::Array(items) => assert!(items.iter().all(ok), "unredacted token in {redacted:?}"),
                one => assert!(ok(one), "unredacted token in {redacted:?}"),
            }
        }
    }
});
