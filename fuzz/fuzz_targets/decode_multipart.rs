//! Multipart bodies: a `Content-Type` header (classified as the listener does)
//! and a body, both arbitrary. Never panics; text fields come out as strings.
#![no_main]

use arbitrary::Arbitrary;
use hooktrail::ingest::decode::{self, BodyKind};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    /// Either a whole Content-Type header value or just a boundary.
    content_type: &'a str,
    raw_boundary: bool,
    body: &'a [u8],
}

fuzz_target!(|input: Input| {
    let boundary = if input.raw_boundary {
        input.content_type.to_string()
    } else {
        match decode::classify(input.content_type) {
            BodyKind::Multipart { boundary } => boundary,
            _ => return,
        }
    };
    let body = bytes::Bytes::copy_from_slice(input.body);
    if let Ok(v) = decode::multipart(body, &boundary) {
        let Value::Object(map) = v else { panic!("multipart() gave a non-object") };
        assert!(map.values().all(|v| v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string))));
    }
});
