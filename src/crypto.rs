//! The few cryptographic operations hooktrail needs, in one place, built on the
//! `hmac`/`sha2`/`subtle` crates: constant-time secret comparison, HMAC
//! computation and verification, and Standard Webhooks key decoding. Used by
//! ingest (verifying senders) and handlers (signing what we forward).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use std::fmt;
use std::sync::Arc;

/// A secret value. `Debug` never shows it, so it cannot leak through logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps secret bytes; from here on only [`Secret::expose`] shows them.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Arc::from(bytes.into().into_boxed_slice()))
    }
    /// The bytes, for the one place that must use them (a comparison, a MAC key).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// The hash behind an HMAC signature scheme (a sender's `algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

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
