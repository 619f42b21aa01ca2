//! `decode::json` on arbitrary bytes: never panics or overflows the stack, and
//! whatever it accepts nests at most MAX_JSON_DEPTH levels and survives a
//! round trip through serde_json.
#![no_main]

use hooktrail::ingest::decode::{self, DecodeError, MAX_JSON_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Equal, except that floats may differ in the last bits: serde_json's default
/// float parser is fast, not correctly rounded, for numbers of many digits
/// (e.g. `400000000013357593885342404152`). Stored payloads are the raw bytes,
/// so only the in-memory view (routing, dedup) sees that last-bit difference.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || ((x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs()))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    match decode::json(data) {
        Ok(v) => {
            assert!(depth(&v) <= MAX_JSON_DEPTH, "accepted JSON nested {} deep", depth(&v));
            let again = serde_json::to_vec(&v).expect("a decoded value serializes");
            let back = decode::json(&again).expect("what we serialize decodes again");
            assert!(same(&back, &v), "round trip changed the value: {v} -> {back}");
        }
        Err(DecodeError::Json(_) | DecodeError::JsonTooDeep | DecodeError::JsonTooManyValues | DecodeError::Empty(_)) => {}
        Err(other) => panic!("json() returned a non-JSON error: {other:?}"),
    }
});
