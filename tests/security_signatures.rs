//! Signature verification through the real binary (README, "Receiving" auth types; issue 5).
//!
//! Every signature here is computed in the test the way the provider's own
//! documentation describes it, with the `hmac`/`sha1`/`sha2` crates, never by
//! calling hooktrail's code. For each scheme: a valid request is accepted, and
//! a wrong signature, a stale timestamp (timestamped schemes), a modified body
//! carrying the original signature, and a missing header each get 401 with a
//! message naming the problem, nothing is stored, and `stats` counts the
//! rejection.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use hmac::Hmac;

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs() as i64
}

/// An hour ago: outside every scheme's default 5-minute tolerance.
fn stale() -> i64 {
    now() - 3600
}

const BODY: &str = r#"{"event":"order.paid","id":"ord_1","amount":4200}"#;
const TAMPERED: &str = r#"{"event":"order.paid","id":"ord_1","amount":1}"#;

/// A header list for one request.
type Headers = Vec<(String, String)>;

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn post(d: &Daemon, path: &str, headers: &Headers, body: &str) -> Resp {
    let mut r = d.request("POST", path).header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(k, v);
    }
    r.body(body).send()
}

/// Asserts a 401 whose error message contains `want`.
fn assert_401(r: &Resp, want: &str) {
    assert_status(r, 401, want);
}

/// After `n` refused requests: nothing stored, and `stats` counts all `n`.
fn assert_refused_and_counted(env: &TestEnv, source: &str, n: u64) {
    wait_rejected(env, source, n);
    assert!(env.events().is_empty(), "a refused request was stored: {:?}", env.events());
}

/// Posts a valid request and checks it is stored with the body as sent.
fn assert_accepted(env: &TestEnv, d: &Daemon, path: &str, headers: &Headers, body: &str) -> String {
    let r = post(d, path, headers, body);
    let id = r.id();
    assert_eq!(env.show(&id)["body"], body);
    id
}

/// Runs the four refusals every scheme must make, then the valid request.
struct Case<'a> {
    env: &'a TestEnv,
    d: &'a Daemon,
    source: &'a str,
    good: Headers,
    wrong_key: Headers,
    /// Signed correctly but an hour old (timestamped schemes only).
    stale: Option<Headers>,
    /// The header whose absence must be refused, and its error message part.
    required: &'a str,
    /// What a bad signature's message names.
    sig_header: &'a str,
}

impl Case<'_> {
    fn run(&self) {
        let path = format!("/hooks/{}", self.source);
        let mut refused = 0;
        assert_401(&post(self.d, &path, &self.wrong_key, BODY), &format!("signature in {} does not match the body", self.sig_header));
        refused += 1;
        assert_401(&post(self.d, &path, &self.good, TAMPERED), &format!("signature in {} does not match the body", self.sig_header));
        refused += 1;
        if let Some(stale) = &self.stale {
            assert_401(&post(self.d, &path, stale, BODY), "outside the allowed tolerance of 300s");
            refused += 1;
        }
        let without: Headers = self.good.iter().filter(|(k, _)| !k.eq_ignore_ascii_case(self.required)).cloned().collect();
        assert_ne!(without.len(), self.good.len(), "{} is not among the good headers", self.required);
        assert_401(&post(self.d, &path, &without, BODY), &format!("missing {} header", self.required.to_ascii_lowercase()));
        refused += 1;
        assert_refused_and_counted(self.env, self.source, refused);

        assert_accepted(self.env, self.d, &path, &self.good, BODY);
        assert_eq!(self.env.events().len(), 1);
    }
}

#[test]
fn github_preset_accepts_documented_signature_and_refuses_forgeries() {
    // GitHub: X-Hub-Signature-256 = "sha256=" + hex(HMAC-SHA256(secret, body)).
    let env = TestEnv::new("[sources.gh]\nauth = { type = \"github\", secret_env = \"GH_SECRET\" }\n");
    let d = env.daemon().env("GH_SECRET", "It's a Secret to Everybody").start();
    let sig = |key: &str| format!("sha256={}", hmac_sha256_hex(key, BODY));
    Case {
        env: &env,
        d: &d,
        source: "gh",
        good: h(&[("X-Hub-Signature-256", &sig("It's a Secret to Everybody"))]),
        wrong_key: h(&[("X-Hub-Signature-256", &sig("not the secret"))]),
        stale: None,
        required: "X-Hub-Signature-256",
        sig_header: "x-hub-signature-256",
    }
    .run();
}

#[test]
fn github_preset_matches_the_example_in_githubs_documentation() {
    // docs.github.com "Validating webhook deliveries": secret "It's a Secret to
    // Everybody", payload "Hello, World!" gives this signature.
    let env = TestEnv::new("[sources.gh]\nauth = { type = \"github\", secret_env = \"GH_SECRET\" }\naccept_any = true\n");
    let d = env.daemon().env("GH_SECRET", "It's a Secret to Everybody").start();
    let r = d
        .request("POST", "/hooks/gh")
        .header("content-type", "text/plain")
        .header("X-Hub-Signature-256", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
        .body("Hello, World!")
        .send();
    r.id();
}

#[test]
fn stripe_preset_accepts_documented_signature_and_refuses_forgeries() {
    // Stripe: Stripe-Signature "t=<ts>,v1=<hex HMAC-SHA256(whsec_… string, "<ts>.<body>")>".
    let secret = "whsec_test_5ZRmW8bR3cJd0w1y2x3z4a5b6c7d8e9f";
    let env = TestEnv::new("[sources.stripe]\nauth = { type = \"stripe\", secret_env = \"STRIPE_WHSEC\" }\n");
    let d = env.daemon().env("STRIPE_WHSEC", secret).start();
    let header = |key: &str, t: i64| {
        let ts = t.to_string();
        format!("t={ts},v1={}", hex::encode(hmac_sha256(key.as_bytes(), &[ts.as_bytes(), b".", BODY.as_bytes()])))
    };
    Case {
        env: &env,
        d: &d,
        source: "stripe",
        good: h(&[("Stripe-Signature", &header(secret, now()))]),
        wrong_key: h(&[("Stripe-Signature", &header("whsec_other", now()))]),
        stale: Some(h(&[("Stripe-Signature", &header(secret, stale()))])),
        required: "Stripe-Signature",
        sig_header: "stripe-signature",
    }
    .run();
}

#[test]
fn stripe_preset_accepts_any_of_several_v1_signatures_during_rotation() {
    // Stripe sends one v1 per active secret while a secret is being rolled.
    let secret = "whsec_new";
    let env = TestEnv::new("[sources.stripe]\nauth = { type = \"stripe\", secret_env = \"STRIPE_WHSEC\" }\n");
    let d = env.daemon().env("STRIPE_WHSEC", secret).start();
    let ts = now().to_string();
    let good = hex::encode(hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", BODY.as_bytes()]));
    let old = hex::encode(hmac_sha256(b"whsec_old", &[ts.as_bytes(), b".", BODY.as_bytes()]));
    let v = format!("t={ts},v1={old},v1={good},v0=ignored");
    assert_accepted(&env, &d, "/hooks/stripe", &h(&[("Stripe-Signature", &v)]), BODY);
    let only_old = format!("t={ts},v1={old}");
    assert_401(&post(&d, "/hooks/stripe", &h(&[("Stripe-Signature", &only_old)]), BODY), "does not match");
}

#[test]
fn shopify_preset_accepts_documented_signature_and_refuses_forgeries() {
    // Shopify: X-Shopify-Hmac-Sha256 = base64(HMAC-SHA256(app secret, body)).
    let env = TestEnv::new("[sources.shop]\nauth = { type = \"shopify\", secret_env = \"SHOPIFY_SECRET\" }\n");
    let d = env.daemon().env("SHOPIFY_SECRET", "shpss_0123456789abcdef").start();
    let sig = |key: &str| B64.encode(hmac_sha256(key.as_bytes(), &[BODY.as_bytes()]));
    Case {
        env: &env,
        d: &d,
        source: "shop",
        good: h(&[("X-Shopify-Hmac-Sha256", &sig("shpss_0123456789abcdef"))]),
        wrong_key: h(&[("X-Shopify-Hmac-Sha256", &sig("shpss_wrong"))]),
        stale: None,
        required: "X-Shopify-Hmac-Sha256",
        sig_header: "x-shopify-hmac-sha256",
    }
    .run();
}

#[test]
fn slack_preset_accepts_documented_signature_and_refuses_forgeries() {
    // Slack: X-Slack-Signature = "v0=" + hex(HMAC-SHA256(signing secret, "v0:<ts>:<body>")),
    // with the timestamp in X-Slack-Request-Timestamp.
    let secret = "8f742231b10e8888abcd99yyyzzz85a5";
    let env = TestEnv::new("[sources.slack]\nauth = { type = \"slack\", secret_env = \"SLACK_SIGNING_SECRET\" }\n");
    let d = env.daemon().env("SLACK_SIGNING_SECRET", secret).start();
    let headers = |key: &str, t: i64| {
        let ts = t.to_string();
        let base = format!("v0:{ts}:{BODY}");
        h(&[
            ("X-Slack-Request-Timestamp", &ts),
            ("X-Slack-Signature", &format!("v0={}", hex::encode(hmac_sha256(key.as_bytes(), &[base.as_bytes()])))),
        ])
    };
    Case {
        env: &env,
        d: &d,
        source: "slack",
        good: headers(secret, now()),
        wrong_key: headers("not-the-signing-secret", now()),
        stale: Some(headers(secret, stale())),
        required: "X-Slack-Signature",
        sig_header: "x-slack-signature",
    }
    .run();
}

#[test]
fn slack_preset_refuses_a_missing_timestamp_header() {
    let secret = "8f742231b10e8888abcd99yyyzzz85a5";
    let env = TestEnv::new("[sources.slack]\nauth = { type = \"slack\", secret_env = \"SLACK_SIGNING_SECRET\" }\n");
    let d = env.daemon().env("SLACK_SIGNING_SECRET", secret).start();
    let ts = now().to_string();
    let sig = format!("v0={}", hex::encode(hmac_sha256(secret.as_bytes(), &[format!("v0:{ts}:{BODY}").as_bytes()])));
    assert_401(&post(&d, "/hooks/slack", &h(&[("X-Slack-Signature", &sig)]), BODY), "missing x-slack-request-timestamp header");
    assert_refused_and_counted(&env, "slack", 1);
}

/// Standard Webhooks headers, signed as [`standard_webhooks_signature`] says.
fn standard_headers(key: &[u8], id: &str, t: i64, body: &str) -> Headers {
    let ts = t.to_string();
    let sig = standard_webhooks_signature(key, id, &ts, body.as_bytes());
    h(&[("webhook-id", id), ("webhook-timestamp", &ts), ("webhook-signature", &sig)])
}

#[test]
fn standard_webhooks_preset_accepts_documented_signature_and_refuses_forgeries() {
    let key = b"standard webhooks key bytes 0123";
    let env = TestEnv::new("[sources.std]\nauth = { type = \"standard_webhooks\", secret_env = \"SW_SECRET\" }\n");
    let d = env.daemon().env("SW_SECRET", &whsec(key)).start();
    Case {
        env: &env,
        d: &d,
        source: "std",
        good: standard_headers(key, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now(), BODY),
        wrong_key: standard_headers(b"some other key", "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now(), BODY),
        stale: Some(standard_headers(key, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", stale(), BODY)),
        required: "webhook-signature",
        sig_header: "webhook-signature",
    }
    .run();
}

#[test]
fn standard_webhooks_preset_refuses_a_changed_message_id_and_accepts_any_listed_signature() {
    let key = b"standard webhooks key bytes 0123";
    let env = TestEnv::new("[sources.std]\nauth = { type = \"standard_webhooks\", secret_env = \"SW_SECRET\" }\n");
    let d = env.daemon().env("SW_SECRET", &whsec(key)).start();
    // The id is signed: a replay under a new id (to dodge dedup) fails.
    let mut replay = standard_headers(key, "msg_original", now(), BODY);
    replay[0].1 = "msg_replayed".into();
    assert_401(&post(&d, "/hooks/std", &replay, BODY), "signature in webhook-signature does not match");
    // Space-separated signatures (several keys, or other versions): any v1 that verifies is enough.
    let mut several = standard_headers(key, "msg_multi", now(), BODY);
    let good = several[2].1.clone();
    several[2].1 = format!("v1a,ignoredpublickeysig v1,{} {good}", B64.encode([0u8; 32]));
    assert_accepted(&env, &d, "/hooks/std", &several, BODY);
}

#[test]
fn preset_secrets_rotate_any_listed_secret_verifies_and_others_do_not() {
    let env = TestEnv::new(
        "[sources.gh]\nauth = { type = \"github\", secrets = [{ secret_env = \"A\" }, { secret_env = \"B\" }] }\n\
         [sources.std]\nauth = { type = \"standard_webhooks\", secrets = [{ secret_env = \"SW_A\" }, { secret_env = \"SW_B\" }] }\n",
    );
    let d = env.daemon().env("A", "old-secret").env("B", "new-secret").env("SW_A", &whsec(b"key-a")).env("SW_B", &whsec(b"key-b")).start();
    let gh = |key: &str| h(&[("X-Hub-Signature-256", &format!("sha256={}", hmac_sha256_hex(key, BODY)))]);
    assert_accepted(&env, &d, "/hooks/gh", &gh("old-secret"), BODY);
    assert_accepted(&env, &d, "/hooks/gh", &gh("new-secret"), BODY);
    assert_401(&post(&d, "/hooks/gh", &gh("third-secret"), BODY), "does not match");
    assert_accepted(&env, &d, "/hooks/std", &standard_headers(b"key-a", "msg_a", now(), BODY), BODY);
    assert_accepted(&env, &d, "/hooks/std", &standard_headers(b"key-b", "msg_b", now(), BODY), BODY);
    assert_401(&post(&d, "/hooks/std", &standard_headers(b"key-c", "msg_c", now(), BODY), BODY), "does not match");
    assert_eq!(env.events().len(), 4);
}

#[test]
fn generic_hmac_secrets_rotate_and_secret_file_is_read() {
    let env = TestEnv::new("");
    let file = env.dir().join("hmac.secret");
    // A trailing newline (as `echo secret > file` writes) is not part of the secret.
    std::fs::write(&file, "from-a-file\n").unwrap();
    env.write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nready_file = {ready}\n{storage}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [sources.rot]\nauth = {{ type = \"hmac\", header = \"X-Sig\", secrets = [{{ secret_env = \"A\" }}, {{ secret_env = \"B\" }}] }}\n\
         [sources.file]\nauth = {{ type = \"hmac\", header = \"X-Sig\", secret_file = {file} }}\n",
        ready = toml_str(&env.ready_file().to_string_lossy()),
        storage = env.storage_section(),
        file = toml_str(&file.to_string_lossy()),
    ));
    let d = env.daemon().env("A", "secret-a").env("B", "secret-b").start();
    let sig = |key: &str| h(&[("X-Sig", &hmac_sha256_hex(key, BODY))]);
    assert_accepted(&env, &d, "/hooks/rot", &sig("secret-a"), BODY);
    assert_accepted(&env, &d, "/hooks/rot", &sig("secret-b"), BODY);
    assert_401(&post(&d, "/hooks/rot", &sig("secret-c"), BODY), "signature in x-sig does not match the body");
    assert_accepted(&env, &d, "/hooks/file", &sig("from-a-file"), BODY);
    assert_401(&post(&d, "/hooks/file", &sig("from-a-file\n"), BODY), "does not match");
}

/// One generic `hmac` configuration and how a sender following it signs.
struct Generic {
    auth: &'static str,
    sign: fn(key: &[u8], ts: &str, body: &str) -> String,
    header: &'static str,
    timestamp_header: Option<&'static str>,
}

fn run_generic(name: &str, g: Generic) {
    let key = "generic-hmac-secret";
    let env = TestEnv::new(&format!("[sources.{name}]\nauth = {{ {}, secret_env = \"HMAC_KEY\" }}\n", g.auth));
    let d = env.daemon().env("HMAC_KEY", key).start();
    let headers = |k: &str, t: i64| {
        let ts = t.to_string();
        let mut out = h(&[(g.header, &(g.sign)(k.as_bytes(), &ts, BODY))]);
        if let Some(th) = g.timestamp_header {
            out.push((th.to_string(), ts));
        }
        out
    };
    Case {
        env: &env,
        d: &d,
        source: name,
        good: headers(key, now()),
        wrong_key: headers("wrong-key", now()),
        stale: g.timestamp_header.map(|_| headers(key, stale())),
        required: g.header,
        sig_header: &g.header.to_ascii_lowercase(),
    }
    .run();
}

#[test]
fn hmac_sha1_hex_with_prefix_verifies_and_refuses_forgeries() {
    run_generic(
        "sha1hex",
        Generic {
            auth: r#"type = "hmac", header = "X-Signature", algorithm = "sha1", encoding = "hex", prefix = "sha1=""#,
            sign: |k, _, body| format!("sha1={}", hex::encode(mac::<Hmac<sha1::Sha1>>(k, &[body.as_bytes()]))),
            header: "X-Signature",
            timestamp_header: None,
        },
    );
}

#[test]
fn hmac_sha256_base64_verifies_and_refuses_forgeries() {
    run_generic(
        "sha256b64",
        Generic {
            auth: r#"type = "hmac", header = "X-Signature", algorithm = "sha256", encoding = "base64""#,
            sign: |k, _, body| B64.encode(hmac_sha256(k, &[body.as_bytes()])),
            header: "X-Signature",
            timestamp_header: None,
        },
    );
}

#[test]
fn hmac_sha512_hex_verifies_and_refuses_forgeries() {
    run_generic(
        "sha512hex",
        Generic {
            auth: r#"type = "hmac", header = "X-Signature", algorithm = "sha512", encoding = "hex""#,
            sign: |k, _, body| hex::encode(mac::<Hmac<sha2::Sha512>>(k, &[body.as_bytes()])),
            header: "X-Signature",
            timestamp_header: None,
        },
    );
}

#[test]
fn hmac_timestamp_dot_body_verifies_and_refuses_stale_and_forged_requests() {
    run_generic(
        "tsbody",
        Generic {
            auth: r#"type = "hmac", header = "X-Signature", algorithm = "sha256", encoding = "hex", prefix = "v1=", timestamp_header = "X-Timestamp", signed_content = "timestamp.body""#,
            sign: |k, ts, body| format!("v1={}", hex::encode(hmac_sha256(k, &[ts.as_bytes(), b".", body.as_bytes()]))),
            header: "X-Signature",
            timestamp_header: Some("X-Timestamp"),
        },
    );
}

#[test]
fn hmac_timestamp_dot_body_refuses_a_signature_moved_to_another_timestamp() {
    // The timestamp is signed: changing it to look fresh breaks the signature.
    let env = TestEnv::new(
        "[sources.ts]\nauth = { type = \"hmac\", header = \"X-Signature\", timestamp_header = \"X-Timestamp\", signed_content = \"timestamp.body\", secret_env = \"K\" }\n",
    );
    let d = env.daemon().env("K", "k").start();
    let old = stale().to_string();
    let sig = hex::encode(hmac_sha256(b"k", &[old.as_bytes(), b".", BODY.as_bytes()]));
    let r = post(&d, "/hooks/ts", &h(&[("X-Signature", &sig), ("X-Timestamp", &now().to_string())]), BODY);
    assert_401(&r, "signature in x-signature does not match the body");
    let r = post(&d, "/hooks/ts", &h(&[("X-Signature", &sig), ("X-Timestamp", "not-a-number")]), BODY);
    assert_401(&r, "x-timestamp header is malformed: timestamp is not unix seconds");
    assert_refused_and_counted(&env, "ts", 2);
}

#[test]
fn malformed_signature_headers_are_refused_with_what_is_wrong() {
    let env = TestEnv::new(
        "[sources.gh]\nauth = { type = \"github\", secret_env = \"K\" }\n\
         [sources.stripe]\nauth = { type = \"stripe\", secret_env = \"K\" }\n\
         [sources.std]\nauth = { type = \"standard_webhooks\", secret_env = \"SW\" }\n\
         [sources.b64]\nauth = { type = \"hmac\", header = \"X-Sig\", encoding = \"base64\", secret_env = \"K\" }\n",
    );
    let d = env.daemon().env("K", "k").env("SW", &whsec(b"k")).start();
    // (path, headers, what the error says)
    type Malformed<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Malformed] = &[
        ("/hooks/gh", &[("X-Hub-Signature-256", "sha1=abcd")], "x-hub-signature-256 header is malformed: expected sha256=<hex>"),
        ("/hooks/gh", &[("X-Hub-Signature-256", "sha256=zz")], "x-hub-signature-256 header is malformed: not hex"),
        ("/hooks/stripe", &[("Stripe-Signature", "v1=abcd")], "stripe-signature header is malformed: no t= timestamp"),
        ("/hooks/stripe", &[("Stripe-Signature", "t=1")], "stripe-signature header is malformed: no v1= signature"),
        (
            "/hooks/std",
            &[("webhook-id", "m"), ("webhook-timestamp", "0"), ("webhook-signature", "v1,AAAA")],
            "webhook-timestamp is outside the allowed tolerance",
        ),
        ("/hooks/b64", &[("X-Sig", "!!!")], "x-sig header is malformed: not base64"),
    ];
    for (path, headers, want) in cases {
        assert_401(&post(&d, path, &h(headers), BODY), want);
    }
    assert!(env.events().is_empty());
}

#[test]
fn published_example_vectors_of_slack_and_standard_webhooks_verify() {
    // The worked examples in Slack's "Verifying requests from Slack" and in the
    // Standard Webhooks specification. Their timestamps are years old, so the
    // tolerance is widened; everything else is as published.
    let env = TestEnv::new(
        "[sources.slack]\nauth = { type = \"slack\", secret_env = \"SLACK\", tolerance = \"100years\" }\n\
         [sources.std]\nauth = { type = \"standard_webhooks\", secret_env = \"SW\", tolerance = \"100years\" }\n",
    );
    let d = env.daemon().env("SLACK", "8f742231b10e8888abcd99yyyzzz85a5").env("SW", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").start();
    let slack_body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let id = d
        .request("POST", "/hooks/slack")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Slack-Request-Timestamp", "1531420618")
        .header("X-Slack-Signature", "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503")
        .body(slack_body)
        .send()
        .id();
    assert_eq!(env.show(&id)["payload"]["command"], "/webhook-collect");
    let std_body = r#"{"test": 2432232314}"#;
    let headers = h(&[
        ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        ("webhook-timestamp", "1614265330"),
        ("webhook-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
    ]);
    assert_accepted(&env, &d, "/hooks/std", &headers, std_body);
}

#[test]
fn a_header_listing_more_than_eight_signatures_is_refused_without_hashing_for_each() {
    // Each listed signature used to cost one HMAC over the whole body: a 64 KiB
    // header of dummy signatures made one request cost gigabytes of hashing.
    let key = b"standard webhooks key bytes 0123";
    let env =
        TestEnv::with_server("max_body_bytes = 2000000", "[sources.std]\nauth = { type = \"standard_webhooks\", secret_env = \"SW\" }\n");
    let d = env.daemon().env("SW", &whsec(key)).start();
    let bogus = format!("v1,{}", B64.encode([7u8; 32]));
    let with = |extra: usize| {
        let mut hs = standard_headers(key, "msg_many", now(), BODY);
        hs[2].1 = format!("{} {}", vec![bogus.as_str(); extra].join(" "), hs[2].1);
        hs
    };
    assert_accepted(&env, &d, "/hooks/std", &with(7), BODY);
    assert_401(&post(&d, "/hooks/std", &with(8), BODY), "webhook-signature header is malformed: lists more than 8 signatures");
    // The attack itself: a 1 MB body and as many signatures as fit in the header.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(1_000_000));
    let mut hs = standard_headers(key, "msg_attack", now(), &big);
    hs[2].1 = vec![bogus.as_str(); 1300].join(" ");
    assert_401(&post(&d, "/hooks/std", &hs, &big), "lists more than 8 signatures");
    assert_eq!(env.events().len(), 1);
}
