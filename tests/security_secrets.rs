//! Secrets stay secret through the real binary (issue 5; README, "Stored headers and secrets" and "Logs"): no
//! token, password, HMAC key or signature shows up in the daemon's log at
//! trace level, in an error body, in stored headers or query, in `events show`,
//! `events list`, or `export`. And `check-config` warns about inline secrets.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use std::time::Duration;

const TOKEN: &str = "tok-3c1b9e77-header";
const QUERY_TOKEN: &str = "tok-5d2a0f13-query";
const PASSWORD: &str = "pw-8e4f6a21-basic";
const HMAC_KEY: &str = "key-7b9c2d40-hmac";
const GH_KEY: &str = "key-1a2b3c4d-github";
const INLINE: &str = "inline-6f5e4d3c-secret";

#[test]
fn secrets_never_reach_logs_error_bodies_storage_show_or_export() {
    let env = TestEnv::new(
        r#"
[sources.hdr]
auth = { type = "header_token", header = "X-Webhook-Token", secret_env = "TOKEN" }
[sources.bearer]
auth = { type = "header_token", header = "Authorization", secret_env = "TOKEN" }
[sources.qry]
auth = { type = "query_token", param = "token", secret_env = "QUERY_TOKEN" }
[sources.basic]
auth = { type = "basic", username = "sender", secret_env = "PASSWORD" }
[sources.mac]
auth = { type = "hmac", header = "X-Signature", prefix = "sha256=", secret_env = "HMAC_KEY" }
[sources.gh]
auth = { type = "github", secret_env = "GH_KEY" }
[sources.inline]
auth = { type = "header_token", header = "X-Inline", secret = "inline-6f5e4d3c-secret" }
"#,
    );
    let d = env
        .daemon()
        .env("RUST_LOG", "trace")
        .env("TOKEN", TOKEN)
        .env("QUERY_TOKEN", QUERY_TOKEN)
        .env("PASSWORD", PASSWORD)
        .env("HMAC_KEY", HMAC_KEY)
        .env("GH_KEY", GH_KEY)
        .start();
    let body = r#"{"email":"lead@example.com"}"#;
    let basic = B64.encode(format!("sender:{PASSWORD}"));
    let mac_sig = format!("sha256={}", hmac_sha256_hex(HMAC_KEY, body));
    let gh_sig = format!("sha256={}", hmac_sha256_hex(GH_KEY, body));
    let json = |path: &str| d.request("POST", path).header("content-type", "application/json");

    // Accepted requests, each carrying its credential.
    let mut ids = vec![
        json("/hooks/hdr").header("X-Webhook-Token", TOKEN).body(body).send().id(),
        json("/hooks/bearer").header("Authorization", &format!("Bearer {TOKEN}")).body(body).send().id(),
        json(&format!("/hooks/qry?token={QUERY_TOKEN}&x=1")).body(body).send().id(),
        d.get(&format!("/hooks/qry?email=a%40b.c&token={QUERY_TOKEN}")).id(),
        json("/hooks/basic").header("Authorization", &format!("Basic {basic}")).body(body).send().id(),
        json("/hooks/mac").header("X-Signature", &mac_sig).body(body).send().id(),
        json("/hooks/gh").header("X-Hub-Signature-256", &gh_sig).body(body).send().id(),
        json("/hooks/inline").header("X-Inline", INLINE).body(body).send().id(),
    ];
    // Refused requests: near-misses whose messages must not echo the secret or what was sent.
    let near = format!("{TOKEN}x");
    let mut refusals = vec![
        json("/hooks/hdr").header("X-Webhook-Token", &near).body(body).send(),
        json("/hooks/qry?token=wrong").body(body).send(),
        json("/hooks/basic").header("Authorization", &format!("Basic {}", B64.encode(format!("sender:{PASSWORD}x")))).body(body).send(),
        json("/hooks/mac").header("X-Signature", &mac_sig).body("{}").send(),
        json("/hooks/gh").header("X-Hub-Signature-256", &gh_sig).body("{}").send(),
    ];
    for r in &refusals {
        assert_eq!(r.status, 401, "{}", r.text());
    }
    refusals.push(d.post_json("/hooks/nowhere", "{}"));
    // Credentials in headers no auth scheme names (cookies, Authorization) are redacted too.
    ids.push(json("/hooks/hdr").header("X-Webhook-Token", TOKEN).header("Cookie", "session=c00kie-9a8b7c").body(body).send().id());

    let secrets = [TOKEN, QUERY_TOKEN, PASSWORD, HMAC_KEY, GH_KEY, INLINE, &basic, &mac_sig, &gh_sig, &near, "c00kie-9a8b7c"];
    let check = |what: &str, text: &str| {
        for s in &secrets {
            assert!(!text.contains(s), "{what} contains the secret {s:?}:\n{text}");
        }
    };
    for r in &refusals {
        check("an error body", &r.text());
    }
    for id in &ids {
        let shown = env.show(id);
        check("events show --json", &shown.to_string());
        check("events show", &env.cli(&["events", "show", id]).stdout);
        // Every request but the two query-token ones carried a credential header.
        let headers = shown["headers"].to_string();
        assert_eq!(headers.contains("[redacted]"), shown["source"] != "qry", "{headers}");
    }
    // The query keeps its shape, with the token's value replaced.
    let q = env.show(&ids[2]);
    assert_eq!(q["query"], "token=[redacted]&x=1");
    // A query-token ping's payload does not carry the token to handlers.
    let ping = env.show(&ids[3]);
    assert_eq!(ping["payload"], serde_json::json!({"email": "a@b.c"}));
    check("events list --json", &serde_json::Value::Array(env.events()).to_string());
    let export = env.cli(&["export"]);
    assert_eq!(export.code, 0, "{export:?}");
    assert_eq!(export.stdout.lines().count(), ids.len());
    check("export", &export.stdout);
    check("stats", &env.cli(&["stats"]).stdout);
    // The log at trace level, after everything above was logged. A garbage
    // request makes the listener log at debug level, proving the level took effect.
    let _ = std::io::Write::write_all(&mut d.connect(), b"\x16\x03\x01garbage\r\n\r\n");
    wait_for("the daemon to log at debug level", Duration::from_secs(10), || d.log().contains("DEBUG"));
    wait_for("the daemon to log the last event", Duration::from_secs(10), || d.log().contains(ids.last().unwrap().as_str()));
    let log = d.log();
    check("the daemon log (RUST_LOG=trace)", &log);
}

#[test]
fn check_config_warns_about_inline_secrets_without_printing_them() {
    let env = TestEnv::raw(&format!(
        "[storage]\npath = \"db.sqlite\"\n[sources.a]\nauth = {{ type = \"header_token\", header = \"X-T\", secret = \"{INLINE}\" }}\n\
         [sources.b]\nauth = {{ type = \"github\", secrets = [{{ secret_env = \"GH\" }}, {{ secret = \"{INLINE}-2\" }}] }}\n"
    ));
    let out = run({
        let mut c = env.command(&["check-config"]);
        c.env("GH", "from-env");
        c
    });
    assert_eq!(out.code, 0, "inline secrets are accepted with a warning: {out:?}");
    assert!(out.stdout.contains("sources.a.auth.secret") && out.stdout.contains("inline secret"), "{out:?}");
    assert!(out.stdout.contains("sources.b.auth.secrets[1].secret"), "{out:?}");
    assert!(!out.stdout.contains(INLINE) && !out.stderr.contains(INLINE), "check-config printed the secret: {out:?}");
    // The daemon logs the same warning at start, again without the value.
    let env = TestEnv::new(&format!("[sources.a]\nauth = {{ type = \"header_token\", header = \"X-T\", secret = \"{INLINE}\" }}\n"));
    let d = env.start();
    wait_for("the inline-secret warning in the log", Duration::from_secs(10), || d.log().contains("inline secret"));
    assert!(!d.log().contains(INLINE));
}

#[test]
fn a_secret_env_that_is_not_set_is_named_without_a_value() {
    let env = TestEnv::new("[sources.a]\nauth = { type = \"stripe\", secret_env = \"STRIPE_WHSEC_UNSET\" }\n");
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("sources.a.auth.secret_env") && out.stdout.contains("`STRIPE_WHSEC_UNSET` is not set"), "{out:?}");
}

#[test]
fn semicolon_separated_query_secrets_and_signature_headers_are_stored_redacted() {
    let env = TestEnv::new("[sources.open]\nauth = { type = \"none\" }\n");
    let d = env.start();
    let sig = "sig-9a8b7c6d-header";
    let qs = "qs-1f2e3d4c-query";
    let r = d
        .request("POST", &format!("/hooks/open?x=1;token={qs}&y=2"))
        .header("content-type", "application/json")
        .header("x-signature", sig)
        .header("x-hub-signature-256", &format!("sha256={sig}"))
        .header("x-plain", "kept")
        .body("{}")
        .send();
    let id = r.id();
    let shown = env.show(&id);
    assert_eq!(shown["query"], "x=1;token=[redacted]&y=2", "the value behind `;` is redacted, the rest kept");
    assert_eq!(shown["headers"]["x-signature"], "[redacted]");
    assert_eq!(shown["headers"]["x-hub-signature-256"], "[redacted]");
    assert_eq!(shown["headers"]["x-plain"], "kept");
    let exported = env.cli(&["export"]).stdout;
    for s in [sig, qs] {
        assert!(!shown.to_string().contains(s) && !exported.contains(s), "{s} was stored: {shown}");
    }
}
