//! Schemes decided from the head (`auth::check_head`: header token, bearer,
//! query token, basic) and the `X-Forwarded-For` walk (`ingest::client_addr`),
//! with arbitrary header values and query strings. Never panics; a request is
//! let in only if it really carries the secret; an untrusted peer's forwarded
//! header never changes its address.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use hooktrail::config::{parse_cidr, AuthSpec};
use hooktrail::crypto::Secret;
use hooktrail::ingest::{auth, client_addr, decode};
use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "s3cret token+value";
const NAMES: &[&str] = &["x-webhook-token", "authorization", "x-forwarded-for"];

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    scheme: u8,
    headers: Vec<(u8, &'a [u8])>,
    query: &'a str,
    peer: [u8; 4],
    peer_trusted: bool,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(16) {
        let name = HeaderName::from_static(NAMES[usize::from(*name) % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    let secrets = vec![Secret::new(SECRET.as_bytes().to_vec())];
    let spec = match input.scheme % 4 {
        0 => AuthSpec::HeaderToken { header: "x-webhook-token".into(), secrets },
        1 => AuthSpec::HeaderToken { header: "authorization".into(), secrets },
        2 => AuthSpec::QueryToken { param: "token".into(), secrets },
        _ => AuthSpec::Basic { username: "sender".into(), secrets },
    };
    if auth::check_head(&spec, &headers, input.query).is_ok() {
        // Only possible when the secret itself was presented, as the scheme says.
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let presented = match input.scheme % 4 {
            0 => header("x-webhook-token") == Some(SECRET),
            1 => {
                header("authorization").map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim())
                    == Some(SECRET)
            }
            2 => {
                // Fuzz inputs (4096 bytes by default) are far under the 10,000-field limit.
                let v = decode::query(input.query, None).expect("a query string under the field limit");
                v.get("token").is_some_and(|t| t == SECRET || t.as_array().is_some_and(|a| a.iter().any(|x| x == SECRET)))
            }
            _ => header("authorization").is_some_and(|v| v.starts_with("Basic ") || v.starts_with("basic ")),
        };
        assert!(presented, "let in without the credential: {input:?}");
    }

    let trusted = vec![parse_cidr("10.0.0.0/8").unwrap(), parse_cidr("127.0.0.1").unwrap()];
    let peer: IpAddr =
        if input.peer_trusted { IpAddr::from([10, input.peer[1], input.peer[2], input.peer[3]]) } else { IpAddr::from(input.peer) };
    let addr = client_addr(peer, &headers, &trusted);
    if !trusted.iter().any(|n| n.contains(&peer)) {
        assert_eq!(addr, peer, "an untrusted peer's X-Forwarded-For was believed");
    }
});
