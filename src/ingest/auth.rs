//! Request authentication: tokens, basic auth, HMAC signatures and the
//! provider presets, each computed exactly as that provider documents it.
//!
//! Every comparison is constant-time: tokens are compared as SHA-256 digests
//! with `subtle` (so neither content nor length leaks), signatures with the
//! `hmac` crate's `verify_slice` (see [`crate::crypto`]). Error messages name what is missing or wrong,
//! never a secret or the expected value.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hyper::HeaderMap;

use crate::config::{AuthSpec, HmacSpec, Preset, SigEncoding, SignedContent};
use crate::crypto::{self, standard_webhooks_key};
use crate::crypto::{HmacAlgorithm, Secret};

/// Why a request did not authenticate. Messages name headers and parameters,
/// never a value, so they are safe to send back and to log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {0} header")]
    MissingHeader(String),
    #[error("missing `{0}` query parameter")]
    MissingParam(String),
    #[error("invalid token in {0}")]
    BadToken(String),
    #[error("invalid username or password")]
    BadBasic,
    #[error("{0} header is malformed: {1}")]
    Malformed(String, &'static str),
    #[error("signature in {0} does not match the body")]
    BadSignature(String),
    #[error("timestamp in {0} is outside the allowed tolerance of {1}s")]
    Stale(String, u64),
}

/// Constant-time comparison of a presented token with a configured secret.
fn secret_eq(given: &[u8], secret: &Secret) -> bool {
    crypto::secret_eq(given, secret.expose())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AuthError> {
    let v = headers.get(name).ok_or_else(|| AuthError::MissingHeader(name.to_string()))?;
    v.to_str().map_err(|_| AuthError::Malformed(name.to_string(), "not ASCII"))
}

/// Whether this scheme needs the body (signatures) or can run before reading it.
pub fn needs_body(spec: &AuthSpec) -> bool {
    matches!(spec, AuthSpec::Hmac(_) | AuthSpec::Preset { .. })
}

/// Checks the schemes that do not need the body. `query` is the raw query string.
pub fn check_head(spec: &AuthSpec, headers: &HeaderMap, query: &str) -> Result<(), AuthError> {
    match spec {
        AuthSpec::None | AuthSpec::Hmac(_) | AuthSpec::Preset { .. } => Ok(()),
        AuthSpec::HeaderToken { header: name, secrets } => {
            let mut value = header(headers, name)?.trim();
            // `Authorization: Bearer <token>` is how most senders put a token there.
            if name == "authorization" {
                if let Some(rest) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
                    value = rest.trim();
                }
            }
            if secrets.iter().any(|s| secret_eq(value.as_bytes(), s)) {
                Ok(())
            } else {
                Err(AuthError::BadToken(format!("{name} header")))
            }
        }
        AuthSpec::QueryToken { param, secrets } => {
            let given = form_urlencoded_get(query, param).ok_or_else(|| AuthError::MissingParam(param.clone()))?;
            if secrets.iter().any(|s| secret_eq(given.as_bytes(), s)) {
                Ok(())
            } else {
                Err(AuthError::BadToken(format!("`{param}` query parameter")))
            }
        }
        AuthSpec::Basic { username, secrets } => {
            let v = header(headers, "authorization")?;
            let encoded = v
                .strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
                .ok_or(AuthError::Malformed("authorization".into(), "expected Basic credentials"))?;
            let decoded = B64.decode(encoded.trim()).map_err(|_| AuthError::Malformed("authorization".into(), "not base64"))?;
            let (user, pass) = match decoded.iter().position(|b| *b == b':') {
                Some(i) => (&decoded[..i], &decoded[i + 1..]),
                None => return Err(AuthError::Malformed("authorization".into(), "expected user:password")),
            };
            let user_ok = secret_eq(user, &Secret::new(username.as_bytes().to_vec()));
            let pass_ok = secrets.iter().any(|s| secret_eq(pass, s));
            if user_ok & pass_ok {
                Ok(())
            } else {
                Err(AuthError::BadBasic)
            }
        }
    }
}

fn form_urlencoded_get(query: &str, name: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).ok()?.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Checks signature schemes on the raw body as received. `now` is unix seconds.
pub fn check_body(spec: &AuthSpec, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
    match spec {
        AuthSpec::Hmac(h) => check_hmac(h, headers, body, now),
        AuthSpec::Preset { preset, tolerance, secrets } => {
            let tol = tolerance.as_secs();
            match preset {
                Preset::Github => {
                    let name = "x-hub-signature-256";
                    let sig = header(headers, name)?;
                    let hex_sig = sig.strip_prefix("sha256=").ok_or(AuthError::Malformed(name.into(), "expected sha256=<hex>"))?;
                    let given = hex::decode(hex_sig.trim()).map_err(|_| AuthError::Malformed(name.into(), "not hex"))?;
                    verify_any(HmacAlgorithm::Sha256, secrets.iter().map(|s| s.expose()), &[body], &[given], name)
                }
                Preset::Shopify => {
                    let name = "x-shopify-hmac-sha256";
                    let given = B64.decode(header(headers, name)?.trim()).map_err(|_| AuthError::Malformed(name.into(), "not base64"))?;
                    verify_any(HmacAlgorithm::Sha256, secrets.iter().map(|s| s.expose()), &[body], &[given], name)
                }
                Preset::Slack => {
                    let ts_name = "x-slack-request-timestamp";
                    let ts = header(headers, ts_name)?.trim().to_string();
                    check_fresh(&ts, ts_name, now, tol)?;
                    let name = "x-slack-signature";
                    let sig = header(headers, name)?;
                    let hex_sig = sig.strip_prefix("v0=").ok_or(AuthError::Malformed(name.into(), "expected v0=<hex>"))?;
                    let given = hex::decode(hex_sig.trim()).map_err(|_| AuthError::Malformed(name.into(), "not hex"))?;
                    let prefix = format!("v0:{ts}:");
                    verify_any(HmacAlgorithm::Sha256, secrets.iter().map(|s| s.expose()), &[prefix.as_bytes(), body], &[given], name)
                }
                Preset::Stripe => {
                    let name = "stripe-signature";
                    let v = header(headers, name)?;
                    let mut ts = None;
                    let mut sigs = Vec::new();
                    for part in v.split(',') {
                        match part.trim().split_once('=') {
                            Some(("t", t)) => ts = Some(t.to_string()),
                            Some(("v1", s)) => {
                                if let Ok(b) = hex::decode(s) {
                                    sigs.push(b)
                                }
                            }
                            _ => {}
                        }
                    }
                    let ts = ts.ok_or(AuthError::Malformed(name.into(), "no t= timestamp"))?;
                    if sigs.is_empty() {
                        return Err(AuthError::Malformed(name.into(), "no v1= signature"));
                    }
                    check_fresh(&ts, name, now, tol)?;
                    let prefix = format!("{ts}.");
                    // Stripe signs with the whole `whsec_…` string as the key.
                    verify_any(HmacAlgorithm::Sha256, secrets.iter().map(|s| s.expose()), &[prefix.as_bytes(), body], &sigs, name)
                }
                Preset::StandardWebhooks => {
                    let id = header(headers, "webhook-id")?.trim().to_string();
                    let ts = header(headers, "webhook-timestamp")?.trim().to_string();
                    check_fresh(&ts, "webhook-timestamp", now, tol)?;
                    let name = "webhook-signature";
                    let v = header(headers, name)?;
                    let sigs: Vec<Vec<u8>> =
                        v.split_whitespace().filter_map(|s| s.strip_prefix("v1,")).filter_map(|s| B64.decode(s).ok()).collect();
                    if sigs.is_empty() {
                        return Err(AuthError::Malformed(name.into(), "no v1,<base64> signature"));
                    }
                    let keys: Vec<Vec<u8>> = secrets.iter().filter_map(standard_webhooks_key).collect();
                    let prefix = format!("{id}.{ts}.");
                    verify_any(HmacAlgorithm::Sha256, keys.iter().map(Vec::as_slice), &[prefix.as_bytes(), body], &sigs, name)
                }
            }
        }
        _ => Ok(()),
    }
}

fn check_fresh(ts: &str, header: &str, now: i64, tolerance: u64) -> Result<(), AuthError> {
    let t: i64 = ts.parse().map_err(|_| AuthError::Malformed(header.into(), "timestamp is not unix seconds"))?;
    if now.abs_diff(t) > tolerance {
        return Err(AuthError::Stale(header.into(), tolerance));
    }
    Ok(())
}

fn check_hmac(h: &HmacSpec, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
    let raw = header(headers, &h.header)?.trim();
    let sig = raw.strip_prefix(h.prefix.as_str()).ok_or(AuthError::Malformed(h.header.clone(), "missing the configured prefix"))?;
    let given = match h.encoding {
        SigEncoding::Hex => hex::decode(sig.trim()).map_err(|_| AuthError::Malformed(h.header.clone(), "not hex"))?,
        SigEncoding::Base64 => B64.decode(sig.trim()).map_err(|_| AuthError::Malformed(h.header.clone(), "not base64"))?,
    };
    let mut ts_prefix = String::new();
    if let Some(ts_header) = &h.timestamp_header {
        let ts = header(headers, ts_header)?.trim().to_string();
        check_fresh(&ts, ts_header, now, h.tolerance.as_secs())?;
        if h.signed_content == SignedContent::TimestampDotBody {
            ts_prefix = format!("{ts}.");
        }
    }
    verify_any(h.algorithm, h.secrets.iter().map(|s| s.expose()), &[ts_prefix.as_bytes(), body], &[given], &h.header)
}

/// Most signatures one request may list (Stripe's `v1=`, Standard Webhooks'
/// `v1,`). Each listed signature costs one HMAC over the whole body per
/// configured key, so without a bound a 64 KiB header of thousands of dummy
/// signatures turns one request into gigabytes of hashing. Senders list one
/// per active secret: two during a rotation.
pub const MAX_SIGNATURES: usize = 8;
// The refusal's message names the bound.
const _: () = assert!(MAX_SIGNATURES == 8);

/// Whether any key's MAC over the concatenated `parts` equals any given signature.
fn verify_any<'k>(
    alg: HmacAlgorithm,
    keys: impl Iterator<Item = &'k [u8]>,
    parts: &[&[u8]],
    given: &[Vec<u8>],
    header: &str,
) -> Result<(), AuthError> {
    if given.len() > MAX_SIGNATURES {
        return Err(AuthError::Malformed(header.to_string(), "lists more than 8 signatures"));
    }
    let mut ok = false;
    for key in keys {
        for sig in given {
            // Evaluate every pair so timing does not reveal which key matched.
            ok |= crypto::hmac_verify(alg, key, parts, sig);
        }
    }
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadSignature(header.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hmac_sha256;
    use std::time::Duration;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn header_token_is_checked() {
        let spec = AuthSpec::HeaderToken { header: "x-t".into(), secrets: vec![Secret::new("old"), Secret::new("new")] };
        assert!(check_head(&spec, &hm(&[("x-t", "new")]), "").is_ok());
        assert!(check_head(&spec, &hm(&[("x-t", "old")]), "").is_ok());
        assert_eq!(check_head(&spec, &hm(&[("x-t", "nope")]), ""), Err(AuthError::BadToken("x-t header".into())));
        assert_eq!(check_head(&spec, &hm(&[]), ""), Err(AuthError::MissingHeader("x-t".into())));
    }

    #[test]
    fn query_and_basic() {
        let q = AuthSpec::QueryToken { param: "token".into(), secrets: vec![Secret::new("s e")] };
        assert!(check_head(&q, &hm(&[]), "a=1&token=s+e").is_ok());
        assert!(check_head(&q, &hm(&[]), "a=1&token=x").is_err());
        let b = AuthSpec::Basic { username: "u".into(), secrets: vec![Secret::new("p")] };
        let good = format!("Basic {}", B64.encode("u:p"));
        assert!(check_head(&b, &hm(&[("authorization", &good)]), "").is_ok());
        let bad = format!("Basic {}", B64.encode("u:q"));
        assert_eq!(check_head(&b, &hm(&[("authorization", &bad)]), ""), Err(AuthError::BadBasic));
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's test vector.
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let spec = AuthSpec::Preset { preset: Preset::StandardWebhooks, tolerance: Duration::from_secs(300), secrets: vec![secret] };
        let body = br#"{"test": 2432232314}"#;
        let h = hm(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            ("webhook-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
        ]);
        assert!(check_body(&spec, &h, body, 1614265330).is_ok());
        assert!(matches!(check_body(&spec, &h, body, 1614265330 + 301), Err(AuthError::Stale(..))));
        assert!(matches!(check_body(&spec, &h, b"{}", 1614265330), Err(AuthError::BadSignature(_))));
    }

    #[test]
    fn a_long_list_of_signatures_is_refused_before_any_hmac_is_computed() {
        // Regression (issue 5): every listed signature cost one HMAC over the whole body.
        let key = b"sekrit";
        let body = b"payload";
        let tol = Duration::from_secs(300);
        let good = hex::encode(hmac_sha256(key, &[b"100.", body]));
        let spec = AuthSpec::Preset { preset: Preset::Stripe, tolerance: tol, secrets: vec![Secret::new(key.to_vec())] };
        let list = |bogus: usize| {
            let mut v = String::from("t=100");
            for _ in 0..bogus {
                v.push_str(&format!(",v1={}", "00".repeat(32)));
            }
            v + ",v1=" + &good
        };
        assert!(check_body(&spec, &hm(&[("stripe-signature", &list(MAX_SIGNATURES - 1))]), body, 100).is_ok());
        assert_eq!(
            check_body(&spec, &hm(&[("stripe-signature", &list(MAX_SIGNATURES))]), body, 100),
            Err(AuthError::Malformed("stripe-signature".into(), "lists more than 8 signatures"))
        );
    }

    #[test]
    fn github_stripe_shopify_slack() {
        let body = b"payload";
        let key = b"sekrit";
        let s = vec![Secret::new(key.to_vec())];
        let tol = Duration::from_secs(300);
        let gh = format!("sha256={}", hex::encode(hmac_sha256(key, &[body])));
        let spec = AuthSpec::Preset { preset: Preset::Github, tolerance: tol, secrets: s.clone() };
        assert!(check_body(&spec, &hm(&[("x-hub-signature-256", &gh)]), body, 0).is_ok());
        assert!(check_body(&spec, &hm(&[("x-hub-signature-256", &gh)]), b"other", 0).is_err());

        let st = format!("t=100,v1={}", hex::encode(hmac_sha256(key, &[b"100.", body])));
        let spec = AuthSpec::Preset { preset: Preset::Stripe, tolerance: tol, secrets: s.clone() };
        assert!(check_body(&spec, &hm(&[("stripe-signature", &st)]), body, 150).is_ok());
        assert!(check_body(&spec, &hm(&[("stripe-signature", &st)]), body, 1000).is_err());

        let sh = B64.encode(hmac_sha256(key, &[body]));
        let spec = AuthSpec::Preset { preset: Preset::Shopify, tolerance: tol, secrets: s.clone() };
        assert!(check_body(&spec, &hm(&[("x-shopify-hmac-sha256", &sh)]), body, 0).is_ok());

        let sl = format!("v0={}", hex::encode(hmac_sha256(key, &[b"v0:100:", body])));
        let spec = AuthSpec::Preset { preset: Preset::Slack, tolerance: tol, secrets: s };
        assert!(check_body(&spec, &hm(&[("x-slack-signature", &sl), ("x-slack-request-timestamp", "100")]), body, 100).is_ok());
        assert!(check_body(&spec, &hm(&[("x-slack-signature", &sl)]), body, 100).is_err());
    }
}
