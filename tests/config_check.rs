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

/// Each handler type takes its own keys: a shell handler carrying an http
/// handler's `url` and `sign` (with an inline secret) and a crm_upsert
/// handler's `provider` and `fields` is refused, each key named with its path
/// and the keys a shell handler does take. The same handler without them passes.
#[test]
fn a_shell_handler_carrying_keys_of_other_types_is_refused_with_each_key_path() {
    let shell = "[handlers.notify]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\ntimeout = \"5s\"\n";
    let foreign = "url = \"https://internal.example.com/inbound\"\nprovider = \"hubspot\"\n\
                   fields = { email = \"/email\" }\nsign = { scheme = \"standard_webhooks\", secret = \"whsec_aW5saW5lLXMzY3JldA==\" }\n";
    let env = TestEnv::new(&format!("[sources.a]\nauth = {{ type = \"none\" }}\n{shell}{foreign}"));
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    for key in ["url", "provider", "fields", "sign"] {
        let line = format!("error: handlers.notify.{key}: not a key of a shell handler (keys: type, command, stdin, env,");
        assert!(out.stdout.lines().any(|l| l.starts_with(&line)), "missing {line:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), 4, "exactly the four keys:\n{}", out.stdout);
    assert!(!format!("{out:?}").contains("whsec_aW5saW5lLXMzY3JldA"), "the inline secret is not echoed: {out:?}");

    let env = TestEnv::new(&format!("[sources.a]\nauth = {{ type = \"none\" }}\n{shell}"));
    let out = check(&env, &[]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// `[storage]` takes the keys of its backend only: `url_env` means nothing to
/// SQLite (the default backend), `path` and `min_free_bytes` nothing to
/// PostgreSQL.
#[test]
fn storage_keys_of_the_other_backend_are_refused_with_their_key_path() {
    let env = TestEnv::raw("[storage]\npath = \"db.sqlite\"\nurl_env = \"HT_TEST_PG_URL\"\n[sources.a]\nauth = { type = \"none\" }\n");
    let out = check(&env, &[("HT_TEST_PG_URL", "postgres://u@localhost/db")]);
    assert_eq!(out.code, 1, "{out:?}");
    let line = "error: storage.url_env: not a key of storage with backend = \"sqlite\" (keys: backend, path, min_free_bytes,";
    assert!(out.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", out.stdout);
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), 1, "{}", out.stdout);

    let env = TestEnv::raw(
        "[storage]\nbackend = \"postgres\"\nurl_env = \"HT_TEST_PG_URL\"\npath = \"db.sqlite\"\nmin_free_bytes = 1\n\
         [sources.a]\nauth = { type = \"none\" }\n",
    );
    let out = check(&env, &[("HT_TEST_PG_URL", "postgres://u@localhost/db")]);
    assert_eq!(out.code, 1, "{out:?}");
    for key in ["path", "min_free_bytes"] {
        let line = format!("error: storage.{key}: not a key of storage with backend = \"postgres\" (keys: backend, url_env,");
        assert!(out.stdout.lines().any(|l| l.starts_with(&line)), "missing {line:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), 2, "{}", out.stdout);
    assert!(!env.dir().join("db.sqlite").exists(), "check-config opens no database");
}

/// `url_env` names the variable holding the PostgreSQL URL; the URL carries
/// the password, so no message ever shows it. Unset or not a URL: a named
/// problem. Set: the config passes, and `serve` and the commands that cannot
/// reach the database say so, naming the variable, never the password.
#[test]
fn postgres_storage_needs_its_url_env_set_and_never_shows_the_url() {
    let env = TestEnv::raw(
        "[storage]\nbackend = \"postgres\"\nurl_env = \"HT_TEST_PG_URL\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [sources.a]\nauth = { type = \"none\" }\n",
    );
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.lines().any(|l| l == "error: storage.url_env: environment variable `HT_TEST_PG_URL` is not set"), "{}", out.stdout);
    assert!(out.stdout.contains("1 problem(s)"), "{}", out.stdout);

    let out = check(&env, &[("HT_TEST_PG_URL", "host=db password=s3cret-pw")]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("error: storage.url_env: environment variable `HT_TEST_PG_URL` does not hold a postgres://"),
        "{}",
        out.stdout
    );
    assert!(!format!("{out:?}").contains("s3cret-pw"), "the value is not echoed: {out:?}");

    // Port 1 on loopback: nothing listens there, so connecting fails at once.
    let url = ("HT_TEST_PG_URL", "postgres://hooktrail:s3cret-pw@127.0.0.1:1/hooktrail?sslmode=require");
    let out = check(&env, &[url]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains("s3cret-pw"), "{}", out.stdout);
    for args in [&["serve"][..], &["events", "list"][..]] {
        let mut c = env.command(args);
        c.env(url.0, url.1);
        let out = run(c);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("cannot open database `(the URL in `HT_TEST_PG_URL`)`"), "{args:?}: {out:?}");
        assert!(!format!("{out:?}").contains("s3cret-pw"), "{args:?}: the password is never shown: {out:?}");
    }
}

/// `check-config` reads the PostgreSQL URL as `serve` would (without
/// connecting): a bad `sslmode`, a bad port or an unreadable `sslrootcert`
/// is an error naming the key and the variable, never showing the
/// password, and nothing is made (no database is reached, no file written).
#[test]
fn check_config_refuses_a_bad_sslmode_or_url_naming_the_key_never_the_password() {
    let env = TestEnv::raw(
        "[storage]\nbackend = \"postgres\"\nurl_env = \"HT_TEST_PG_URL\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [sources.a]\nauth = { type = \"none\" }\n",
    );
    let missing_root = env.dir().join("no-such-root.pem");
    let cases = [
        (
            "postgres://hooktrail:s3cret-pw@127.0.0.1:1/hooktrail?sslmode=verify-fulll".to_string(),
            "error: storage.url_env: the URL in `HT_TEST_PG_URL` has sslmode=verify-fulll; expected disable, prefer, require or verify-full",
        ),
        (
            "postgres://hooktrail:s3cret-pw@127.0.0.1:notaport/hooktrail".to_string(),
            "error: storage.url_env: the URL in `HT_TEST_PG_URL` is not a valid postgres:// URL (invalid connection string: invalid value for option `port`)",
        ),
        (
            format!("postgres://hooktrail:s3cret-pw@127.0.0.1:1/hooktrail?sslmode=verify-full&sslrootcert={}", missing_root.display()),
            "error: storage.url_env: the URL in `HT_TEST_PG_URL` names sslrootcert",
        ),
    ];
    let before: Vec<_> = std::fs::read_dir(env.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    for (url, want) in &cases {
        let out = check(&env, &[("HT_TEST_PG_URL", url)]);
        assert_eq!(out.code, 1, "{url}: {out:?}");
        assert!(out.stdout.lines().any(|l| l.starts_with(want)), "{url}: want a line starting {want:?}: {}", out.stdout);
        assert!(out.stdout.contains("1 problem(s)"), "{}", out.stdout);
        assert!(!format!("{out:?}").contains("s3cret-pw"), "the password is never shown: {out:?}");
    }
    let after: Vec<_> = std::fs::read_dir(env.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "check-config made nothing");
    // A good sslmode passes (nothing listens on port 1: check-config does not connect).
    let out = check(&env, &[("HT_TEST_PG_URL", "postgres://hooktrail:s3cret-pw@127.0.0.1:1/hooktrail?sslmode=verify-full")]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// `auth` is tagged by `type` the same way: a key of another auth type (a
/// `param` on header_token, a `header` on a preset), a secret on `none`, or
/// a key of no type at all is refused with its key path, and the path of a
/// key inside a list item reads like every other path.
#[test]
fn an_auth_key_of_another_type_is_refused_with_its_key_path() {
    let env = TestEnv::new(
        r#"
[sources.a]
auth = { type = "none", secret_env = "HT_TEST_A" }
[sources.b]
auth = { type = "header_token", header = "X-T", param = "token", secrets = [{ secret_env = "HT_TEST_A", nope = 1 }] }
[sources.c]
auth = { type = "github", secret_env = "HT_TEST_A", header = "X-Hub-Signature-256", colour = "blue" }
[handlers.f]
type = "http"
url = "http://127.0.0.1:9/"
sign = { scheme = "standard_webhooks", secret_env = "HT_TEST_W", colour = "red" }
"#,
    );
    let out = check(&env, &[("HT_TEST_A", "s"), ("HT_TEST_W", "whsec_c2VjcmV0")]);
    assert_eq!(out.code, 1, "{out:?}");
    let expected = [
        "error: sources.a.auth.secret_env: not a key of none auth (keys: type)",
        "error: sources.b.auth.param: not a key of header_token auth (keys: type, header, secret_env, secret_file, secret, secrets)",
        "error: sources.b.auth.secrets[0].nope: unknown key",
        "error: sources.c.auth.colour: not a key of github auth (keys: type, tolerance, secret_env,",
        "error: sources.c.auth.header: not a key of github auth (keys: type, tolerance, secret_env,",
        "error: handlers.f.sign.colour: unknown key",
    ];
    for line in expected {
        assert!(out.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), expected.len(), "{}", out.stdout);
}

/// Issue 16: a misspelt key is named with a plain path (no serde `?`) and
/// the key it most likely meant, inside an inline table too.
#[test]
fn a_misspelt_key_gets_did_you_mean_with_a_plain_key_path() {
    let env = TestEnv::raw(
        "[server]\nrequest_timout = \"30s\"\n[sources.demo]\nauth = { type = \"none\" }\ndedup = { key = \"/x\", windw = \"1h\" }\n\
         [handlrs.x]\n",
    );
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let expected = [
        "error: handlrs: unknown key; did you mean `handlers`?",
        "error: server.request_timout: unknown key; did you mean `request_timeout`?",
        "error: sources.demo.dedup.windw: unknown key; did you mean `window`?",
    ];
    for line in expected {
        assert!(out.stdout.lines().any(|l| l == line), "missing {line:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), expected.len(), "{}", out.stdout);
}

/// Issue 16: an unknown `auth.type` lists the valid ones, and a duration
/// written as a number says which string to write.
#[test]
fn an_unknown_auth_type_lists_the_valid_ones_and_a_numeric_duration_says_what_to_write() {
    let env = TestEnv::raw("[server]\nrequest_timeout = 30\n[sources.demo]\nauth = { type = \"hmca\", header = \"X-S\" }\n");
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let expected = [
        "error: server.request_timeout: a duration is a string with a unit: write \"30s\"",
        "error: sources.demo.auth.type: unknown auth type `hmca`; did you mean `hmac`? expected none, header_token, query_token, basic, hmac, standard_webhooks, github, stripe, shopify or slack",
    ];
    for line in expected {
        assert!(out.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), expected.len(), "{}", out.stdout);
}

/// Issue 16: a handler (or source) that is declared but invalid is reported
/// at its own table; the route naming it adds no "no handler named".
#[test]
fn an_invalid_handler_is_not_also_reported_missing_by_its_route() {
    let env = TestEnv::raw(
        "[sources.demo]\nauth = { type = \"bogus\" }\n[handlers.h]\ntype = \"shell\"\ncommand = \"not-a-list\"\n\
         [[routes]]\nsource = \"demo\"\nhandler = \"h\"\n[[routes]]\nsource = \"demo\"\nhandler = \"nobody\"\n",
    );
    let out = check(&env, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.lines().any(|l| l.starts_with("error: handlers.h.command: ")), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l.starts_with("error: sources.demo.auth.type: ")), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l == "error: routes[1].handler: no handler named `nobody`"), "a real typo still is: {}", out.stdout);
    assert!(!out.stdout.contains("routes[0]") && !out.stdout.contains("no source named"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("error: ")).count(), 3, "{}", out.stdout);
}

/// Issue 16: every example's (commented) CRM handler shows `base_url`, so
/// pointing it at a staging CRM or a local stub is one edit; with only that
/// line changed, the uncommented block passes `check-config`.
#[test]
fn every_example_crm_block_shows_base_url_and_passes_with_only_that_line_changed() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut blocks = 0;
    for dir in std::fs::read_dir(&examples).unwrap() {
        let file = dir.unwrap().path().join("hooktrail.toml");
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with("# [handlers.") {
                continue;
            }
            let block: Vec<String> = lines[i..]
                .iter()
                .take_while(|l| l.starts_with("# ") && !l.starts_with("# [["))
                .map(|l| l.trim_start_matches("# ").to_string())
                .collect();
            if !block.iter().any(|l| l == "type = \"crm_upsert\"") {
                continue;
            }
            blocks += 1;
            let name = format!("{}: {}", file.display(), block[0]);
            let at = block.iter().position(|l| l.starts_with("base_url = ")).unwrap_or_else(|| panic!("{name} lacks base_url"));
            let mut edited = block.clone();
            edited[at] = "base_url = \"http://127.0.0.1:9/\"".to_string();
            let env = TestEnv::new(&format!("[sources.a]\nauth = {{ type = \"none\" }}\n{}\n", edited.join("\n")));
            let out = check(&env, &[("HUBSPOT_TOKEN", "t")]);
            assert_eq!(out.code, 0, "{name}:\n{}\n{out:?}", edited.join("\n"));
        }
    }
    assert!(blocks >= 6, "found only {blocks} CRM blocks");
}
