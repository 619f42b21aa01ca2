//! Configuration through the binary (README, "Configuration"): `check-config` lists every
//! problem with its key path and exits 1, passes the shipped config, and
//! `HOOKTRAIL__…` environment overrides take effect in the daemon.

mod common;

use std::path::Path;

use common::*;

const BROKEN: &str = r#"
[server]
listen = "127.0.0.1:8080"
request_timeout = "5 parsecs"
bogus = 1

[storage]
path = "./never-created.db"

[sources.nr]
auth = { header = "X-Webhook-Token", secret_env = "NR_TOKEN" }

[sources.noauth]
path = "/hooks/noauth"

[sources.op]
auth = { type = "query_token", param = "token", secret_env = "HT_TEST_UNSET_SECRET_VAR" }
colour = "blue"
"#;

fn check(env: &TestEnv, vars: &[(&str, &str)]) -> CliOutput {
    let mut c = env.command(&["check-config"]);
    for (k, v) in vars {
        c.env(k, v);
    }
    run(c)
}

#[test]
fn check_config_lists_every_problem_with_its_key_path_and_exits_1() {
    let env = TestEnv::raw(BROKEN);
    let out = check(&env, &[("NR_TOKEN", "set")]);
    assert_eq!(out.code, 1, "{out:?}");
    let expected = [
        "error: server.bogus: unknown key",
        "error: server.request_timeout: invalid duration `5 parsecs`",
        "error: sources.nr.auth.type: is required",
        "error: sources.noauth.auth: is required",
        "error: sources.op.auth.secret_env: environment variable `HT_TEST_UNSET_SECRET_VAR` is not set",
        "error: sources.op.colour: unknown key",
    ];
    for line in expected {
        assert!(out.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", out.stdout);
    }
    let errors = out.stdout.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(errors, expected.len(), "exactly the problems above:\n{}", out.stdout);
    assert!(out.stdout.contains(&format!("{} problem(s)", expected.len())), "{}", out.stdout);
    assert!(!Path::new("./never-created.db").exists() && !env.dir().join("never-created.db").exists(), "check-config opens no database");
}

#[test]
fn serve_refuses_a_broken_config_and_exits_nonzero() {
    let env = TestEnv::raw(BROKEN);
    let out = run(env.command(&["serve"]));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("server.request_timeout") && out.stderr.contains("sources.noauth.auth"), "{out:?}");
}

#[test]
fn check_config_passes_the_shipped_config() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hooktrail.toml");
    let mut c = clean_command();
    c.arg("--config").arg(&shipped).arg("check-config");
    let out = run(c);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(": ok ("), "{}", out.stdout);
    assert!(!out.stdout.contains("error:"), "{}", out.stdout);
}

#[test]
fn check_config_warns_about_an_inline_secret_but_passes() {
    let env = TestEnv::new("[sources.a]\nauth = { type = \"header_token\", header = \"X-T\", secret = \"inline-s3cret\" }\n");
    let out = check(&env, &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("warning: sources.a.auth.secret: inline secret"), "{}", out.stdout);
    assert!(!out.stdout.contains("inline-s3cret") && !out.stderr.contains("inline-s3cret"), "the secret is not echoed: {out:?}");
}

#[test]
fn check_config_sees_environment_overrides_and_the_secret_env_it_names() {
    let env = TestEnv::new("[sources.a]\nauth = { type = \"header_token\", header = \"X-T\", secret_env = \"HT_TEST_A_TOKEN\" }\n");
    let out = check(&env, &[("HT_TEST_A_TOKEN", "t")]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("error: sources.a.auth.secret_env: environment variable `HT_TEST_A_TOKEN` is not set"), "{}", out.stdout);

    // The file's values are valid; the overrides are checked like file values.
    let out = check(&env, &[("HT_TEST_A_TOKEN", "t"), ("HOOKTRAIL__SERVER__LISTEN", "nope")]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("error: server.listen: `nope` is not an address"), "{}", out.stdout);
    let out = check(&env, &[("HT_TEST_A_TOKEN", "t"), ("HOOKTRAIL__SERVER__REQUEST_TIMEOUT", "forever")]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("error: server.request_timeout: invalid duration `forever`"), "{}", out.stdout);
}

/// Two problems in one table: a value of the wrong type (a bad duration) must
/// not hide a bad value of another key, or `check-config` does not list
/// "every problem" (README, "Command line").
#[test]
fn check_config_lists_two_bad_keys_of_one_table() {
    let env = TestEnv::raw("[server]\nlisten = \"nope\"\nrequest_timeout = \"5 parsecs\"\n[sources.a]\nauth = { type = \"none\" }\n");
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("error: server.request_timeout: invalid duration `5 parsecs`"), "{}", out.stdout);
    assert!(out.stdout.contains("error: server.listen: `nope` is not an address"), "{}", out.stdout);
}

#[test]
fn env_override_of_max_body_bytes_takes_effect_in_the_daemon() {
    // The file says nothing about max_body_bytes (default 1 MiB); the environment says 32.
    let env = TestEnv::new("[sources.api]\nauth = { type = \"none\" }\n");
    let d = env.daemon().env("HOOKTRAIL__SERVER__MAX_BODY_BYTES", "32").start();
    let exact = format!(r#"{{"pad":"{}"}}"#, "x".repeat(32 - 10));
    assert_eq!(exact.len(), 32);
    d.post_json("/hooks/api", &exact).id();
    let over = format!(r#"{{"pad":"{}"}}"#, "x".repeat(33 - 10));
    let r = d.post_json("/hooks/api", &over);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.error().contains("server.max_body_bytes (32 bytes)"), "{}", r.error());
    assert_eq!(env.events().len(), 1);
}

#[test]
fn a_json_response_template_that_is_not_json_is_refused_with_its_key_path() {
    let env = TestEnv::new(
        r#"
[sources.tpl]
auth = { type = "none" }
response = { body = '{"n":{{/n}}' }
[sources.fine]
auth = { type = "none" }
response = { body = '{"n":{{/n}},"s":"{{/s}}"}' }
[sources.text]
auth = { type = "none" }
response = { body = 'ok {{/n}}', content_type = "text/plain" }
"#,
    );
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("sources.tpl.response.body") && all.contains("is not a JSON document"), "{all}");
    assert!(!all.contains("sources.fine") && !all.contains("sources.text"), "valid templates pass: {all}");
}
