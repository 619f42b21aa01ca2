//! Signatures computed the way each provider documents them, with the
//! `hmac`/`sha1`/`sha2` crates: never by calling hooktrail's own code, so a
//! test that signs here checks the daemon against the documentation.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};

/// The MAC `M` (e.g. `Hmac<sha1::Sha1>`) of the concatenated `parts` under `key`.
pub fn mac<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    Mac::finalize(m).into_bytes().to_vec()
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac::<Hmac<sha2::Sha256>>(key, parts)
}

/// Lower-case hex HMAC-SHA256 of `body` under `key` (GitHub's and the generic
/// `hmac` auth's default form, before any `sha256=` prefix).
pub fn hmac_sha256_hex(key: &str, body: &str) -> String {
    hex::encode(hmac_sha256(key.as_bytes(), &[body.as_bytes()]))
}

/// A Standard Webhooks secret: `whsec_` + base64 of the key bytes.
pub fn whsec(key: &[u8]) -> String {
    format!("whsec_{}", B64.encode(key))
}

/// A Standard Webhooks signature, `v1,<base64>`: HMAC-SHA256 over
/// `<id>.<timestamp>.<body>` with the key bytes (base64-decoded from after `whsec_`).
pub fn standard_webhooks_signature(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(hmac_sha256(key, &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body])))
}
