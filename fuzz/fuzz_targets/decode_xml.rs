//! `decode::xml` on arbitrary bytes: never panics or overflows the stack, and
//! what it accepts is `{"<root>": …}` with a single root.
#![no_main]

use hooktrail::ingest::decode;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = decode::xml(data) {
        let Value::Object(map) = &v else { panic!("xml() gave a non-object: {v}") };
        assert_eq!(map.len(), 1, "xml() gave {} roots", map.len());
        serde_json::to_vec(&v).expect("the view serializes");
    }
});
