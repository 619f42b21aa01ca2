//! The few cryptographic operations hooktrail needs, in one place, built on the
//! `hmac`/`sha2`/`subtle` crates: constant-time secret comparison, HMAC
//! computation and verification, and Standard Webhooks key decoding. Used by
//! ingest (verifying senders) and handlers (signing what we forward).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::config::{HmacAlgorithm, Secret};

/// Constant-time equality that leaks neither content nor length: both sides
/// are hashed first, then the digests compared with `subtle`.
pub fn secret_eq(given: &[u8], secret: &[u8]) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(secret);
    a.ct_eq(&b).into()
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Whether `sig` is the HMAC of the concatenated `parts` under `key`,
/// compared in constant time by the `hmac` crate.
pub fn hmac_verify(alg: HmacAlgorithm, key: &[u8], parts: &[&[u8]], sig: &[u8]) -> bool {
    macro_rules! run {
        ($d:ty) => {{
            let mut m = <Hmac<$d> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
            for p in parts {
                m.update(p);
            }
            m.verify_slice(sig).is_ok()
        }};
    }
    match alg {
        HmacAlgorithm::Sha1 => run!(sha1::Sha1),
        HmacAlgorithm::Sha256 => run!(Sha256),
        HmacAlgorithm::Sha512 => run!(Sha512),
    }
}

/// The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`.
pub fn standard_webhooks_key(s: &Secret) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(s.expose()).ok()?;
    let rest = text.strip_prefix("whsec_")?;
    B64.decode(rest).ok().filter(|k| !k.is_empty())
}
