//! The HTTP forward handler through the real binary (issue 4): a real HTTP
//! server on loopback in the test records every request it gets, and the test
//! asserts on both what that peer saw and what `events show --json` recorded.
//!
//! Proven here: 5xx retried until 2xx with every status recorded, 4xx and 3xx
//! (redirects are not followed) failing without retry, connection errors
//! retried, `Retry-After` honoured, body modes raw/json/envelope, `${VAR}`
//! headers from the daemon's environment, and Standard Webhooks signatures a
//! receiver can verify.

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Fast polling and retries (2 attempts), and the open source `leads`.
fn fast() -> String {
    fast_retries(2, "200ms", "") + &open_source("leads")
}

/// An `http` handler `name` to `url` with `extra` keys, and a route to it from `leads`.
fn http_handler(name: &str, url: &str, extra: &str) -> String {
    format!("[handlers.{name}]\ntype = \"http\"\nurl = {}\n{extra}\n\n{}", toml_str(url), route("leads", name))
}

#[test]
fn forward_retries_5xx_and_connection_errors_recording_each_status() {
    let peer =
        FakePeer::start(|_, n| if n == 1 { PeerReply::new(503, "busy, come back later") } else { PeerReply::new(200, "ok, thanks") });
    // A port with nothing listening: bind, note, close.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config =
        [fast().as_str(), &http_handler("crm", &peer.url("/inbound"), ""), &http_handler("down", &format!("http://{closed}/inbound"), "")]
            .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let body = r#"{"email":"a@b.c"}"#;
    let id = d.post_json("/hooks/leads", body).id();
    let ev = wait_settled(&env, &id);

    let crm = delivery(&ev, "crm");
    assert_eq!(crm["status"], "succeeded", "{ev:#}");
    let a = attempts(crm);
    assert_eq!(a.len(), 2, "{crm:#}");
    assert_eq!((a[0]["number"].clone(), a[0]["outcome"].clone(), a[0]["http_status"].clone()), (json!(1), json!("retry"), json!(503)));
    assert!(a[0]["error"].is_null(), "the status is in http_status, not restated: {crm:#}");
    assert_eq!(a[0]["output"], "busy, come back later", "the response body is kept");
    assert_eq!((a[1]["number"].clone(), a[1]["outcome"].clone(), a[1]["http_status"].clone()), (json!(2), json!("success"), json!(200)));
    assert!(a[1]["error"].is_null());
    assert_eq!(a[1]["output"], "ok, thanks");
    let seen = peer.requests_to("/inbound");
    assert_eq!(seen.len(), 2, "the peer saw the first try and the retry");
    assert!(seen.iter().all(|s| s.method == "POST" && s.body == body.as_bytes()), "{seen:?}");

    let down = delivery(&ev, "down");
    assert_eq!(down["status"], "failed", "{ev:#}");
    let a = attempts(down);
    assert_eq!(a.len(), 2, "a connection error is retried, up to max_attempts: {down:#}");
    for (i, at) in a.iter().enumerate() {
        assert_eq!(at["outcome"], if i == 1 { "failure" } else { "retry" }, "the attempt that ends the delivery reads failure");
        assert!(at["http_status"].is_null());
        assert!(at["error"].as_str().is_some_and(|e| e.contains("connect")), "{down:#}");
    }
}

#[test]
fn forward_4xx_and_redirects_fail_without_retry() {
    let peer = FakePeer::start(|s, _| match s.path.as_str() {
        "/reject" => PeerReply::new(400, r#"{"error":"email is invalid"}"#),
        "/moved" => PeerReply::new(302, "").header("location", "/elsewhere"),
        _ => PeerReply::new(200, "ok"),
    });
    let config =
        [fast().as_str(), &http_handler("strict", &peer.url("/reject"), ""), &http_handler("moved", &peer.url("/moved"), "")].concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"email":"not-an-email"}"#).id();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "failed");

    let strict = delivery(&ev, "strict");
    assert_eq!(strict["status"], "failed");
    let a = attempts(strict);
    assert_eq!(a.len(), 1, "a 400 is not retried: {strict:#}");
    assert_eq!((a[0]["outcome"].clone(), a[0]["http_status"].clone()), (json!("failure"), json!(400)));
    assert_eq!(a[0]["output"], r#"{"error":"email is invalid"}"#, "the peer's explanation is kept");
    assert_eq!(peer.requests_to("/reject").len(), 1);

    let moved = delivery(&ev, "moved");
    assert_eq!(moved["status"], "failed");
    let a = attempts(moved);
    assert_eq!(a.len(), 1, "a redirect is a failure, not retried: {moved:#}");
    assert_eq!((a[0]["outcome"].clone(), a[0]["http_status"].clone()), (json!("failure"), json!(302)));
    assert_eq!(peer.requests_to("/moved").len(), 1);
    assert!(peer.requests_to("/elsewhere").is_empty(), "the redirect was followed");
}

#[test]
fn forward_honours_retry_after() {
    let peer =
        FakePeer::start(
            |_, n| {
                if n == 1 {
                    PeerReply::new(429, "slow down").header("retry-after", "1")
                } else {
                    PeerReply::new(200, "ok")
                }
            },
        );
    // initial_backoff is 100ms: only Retry-After explains a gap of a second.
    let env = TestEnv::new(&[fast().as_str(), &http_handler("limited", &peer.url("/limited"), "")].concat());
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"n":1}"#).id();
    let ev = wait_settled(&env, &id);
    let lim = delivery(&ev, "limited");
    assert_eq!(lim["status"], "succeeded", "{ev:#}");
    let a = attempts(lim);
    assert_eq!(a.len(), 2);
    assert_eq!((a[0]["outcome"].clone(), a[0]["http_status"].clone()), (json!("retry"), json!(429)));
    assert_eq!((a[1]["outcome"].clone(), a[1]["http_status"].clone()), (json!("success"), json!(200)));
    let seen = peer.requests_to("/limited");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    // Correctness, not speed: the retry may not come before the peer allowed it.
    // (10 ms of slack for the daemon's wall clock vs the peer's monotonic one.)
    assert!(gap >= Duration::from_millis(990), "second request came {gap:?} after the 429 with Retry-After: 1");
}

#[test]
fn forward_body_modes_env_headers_and_standard_webhooks_signature() {
    let peer = FakePeer::start(|_, _| PeerReply::new(204, ""));
    let key = b"0123456789abcdef-signing-key";
    let secret = whsec(key);
    let config = [
        fast().as_str(),
        &http_handler("fwd_raw", &peer.url("/raw"), r#"headers = { Authorization = "Bearer ${FWD_TOKEN}", X-Static = "plain" }"#),
        &http_handler("fwd_json", &peer.url("/json"), "body = \"json\"\nmethod = \"PUT\""),
        &http_handler(
            "fwd_envelope",
            &peer.url("/envelope"),
            "body = \"envelope\"\nsign = { scheme = \"standard_webhooks\", secret_env = \"FWD_SIGNING_SECRET\" }",
        ),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.daemon().env("FWD_TOKEN", "tok-7f3a9c").env("FWD_SIGNING_SECRET", &secret).start();
    let form = "first_name=Daniel&email=dgolden%40mid-corp.com&tags=a&tags=b";
    let id = d.request("POST", "/hooks/leads?utm=x").header("content-type", "application/x-www-form-urlencoded").body(form).send().id();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    for h in ["fwd_raw", "fwd_json", "fwd_envelope"] {
        let a = attempts(delivery(&ev, h));
        assert_eq!((a.len(), a[0]["http_status"].clone()), (1, json!(204)), "{h}: {ev:#}");
    }
    let payload = json!({"first_name": "Daniel", "email": "dgolden@mid-corp.com", "tags": ["a", "b"]});
    assert_eq!(ev["payload"], payload);

    let raw = &peer.requests_to("/raw")[0];
    assert_eq!(raw.method, "POST");
    assert_eq!(raw.body, form.as_bytes(), "body = raw: the bytes as received");
    assert_eq!(raw.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(raw.header("authorization"), Some("Bearer tok-7f3a9c"), "${{VAR}} comes from the daemon's environment");
    assert_eq!(raw.header("x-static"), Some("plain"));
    assert!(raw.header("webhook-signature").is_none(), "only handlers with `sign` sign");

    let js = &peer.requests_to("/json")[0];
    assert_eq!(js.method, "PUT");
    assert_eq!(js.header("content-type"), Some("application/json"));
    assert_eq!(js.json(), payload, "body = json: the normalized payload");
    assert!(js.header("authorization").is_none(), "headers are per handler");

    let envl = &peer.requests_to("/envelope")[0];
    assert_eq!(envl.header("content-type"), Some("application/json"));
    let doc = envl.json();
    let keys: BTreeSet<&str> = doc.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["id", "source", "received_at", "content_type", "headers", "query", "payload"]));
    assert_eq!(doc["id"], id.as_str());
    assert_eq!(doc["source"], "leads");
    assert_eq!(doc["received_at"], ev["received_at"]);
    assert_eq!(doc["content_type"], "application/x-www-form-urlencoded");
    assert_eq!(doc["query"], "utm=x");
    assert_eq!(doc["payload"], payload);

    // Standard Webhooks: HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}"
    // with the base64-decoded key after `whsec_`, sent as "v1,<base64>".
    let msg_id = envl.header("webhook-id").expect("webhook-id");
    let ts = envl.header("webhook-timestamp").expect("webhook-timestamp");
    let sigs = envl.header("webhook-signature").expect("webhook-signature");
    assert_eq!(msg_id, id, "the event id is the message id, stable across retries");
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().expect("timestamp in seconds");
    assert!((-5..=300).contains(&age), "timestamp within a receiver's 5-minute tolerance: {age}s");
    let expected = standard_webhooks_signature(key, msg_id, ts, &envl.body);
    assert!(sigs.split(' ').any(|s| s == expected), "signature {sigs:?} does not verify (expected {expected:?})");

    assert!(!env.log().contains("tok-7f3a9c"), "a ${{VAR}} header secret reached the log");
    assert!(!env.log().contains(&secret), "the signing secret reached the log");
}
