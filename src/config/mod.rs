//! Typed configuration: loaded once (at start and on reload) from TOML plus
//! `HOOKTRAIL__…` environment overrides, validated with key paths, then frozen
//! into [`Config`] and shared by `Arc`. Hot paths never parse config.
//!
//! Loading never stops at the first problem: every section, source, handler and
//! route is deserialized on its own so `check-config` can list every problem.
//!
//! One file per concern: `server` (the two listeners), `storage`, `sources`,
//! `handlers` (with `[retry]` and `[processor]`), `routes`; each turns its raw
//! tables into frozen types through the `check` module's `Checker`, which
//! like `values` (shapes several sections share) imports none of them. This
//! file assembles the whole and holds what callers load it with. Config holds
//! data only: what acts on it (route matching, say) lives with the code that
//! acts.

mod check;
mod handlers;
mod routes;
mod server;
mod sources;
mod storage;
mod values;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

pub use check::{ConfigErrors, Problem};
pub use handlers::{
    BodyMode, CrmProvider, CrmSpec, HandlerConfig, HandlerKind, HttpSpec, OnFailure, Ordering, ProcessorConfig, RetryPolicy, ShellSpec,
    StdinMode,
};
pub use routes::{Condition, ConditionTest, RouteConfig};
pub use server::{AdminConfig, ServerConfig};
pub use sources::{AuthSpec, DedupKey, DedupSpec, HmacSpec, Preset, ResponseSpec, SigEncoding, SignedContent, SourceConfig};
pub use storage::{Backend, PostgresConfig, SqliteConfig, StorageConfig};
pub use values::RateLimit;

use check::Checker;

/// A validated, frozen configuration plus the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<Config>,
    pub warnings: Vec<Problem>,
}

/// The whole validated configuration. Frozen: a reload builds a new one and
/// swaps it in, so a request or attempt in flight keeps the one it started with.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub admin: AdminConfig,
    pub retry: RetryPolicy,
    pub processor: ProcessorConfig,
    /// Sorted by name.
    pub sources: Vec<Arc<SourceConfig>>,
    pub handlers: BTreeMap<String, Arc<HandlerConfig>>,
    pub routes: Vec<RouteConfig>,
    /// Environment variables the config reads secrets from; kept out of
    /// handler processes' environments.
    pub secret_vars: Vec<String>,
}

/// The top-level tables a config may hold.
const SECTIONS: [&str; 8] = ["server", "storage", "admin", "retry", "processor", "sources", "handlers", "routes"];

/// Which file to load: `--config`, else `$HOOKTRAIL_CONFIG`, else
/// `./config/hooktrail.toml`, else `/etc/hooktrail/hooktrail.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("HOOKTRAIL_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("./config/hooktrail.toml");
    if local.exists() {
        return local;
    }
    PathBuf::from("/etc/hooktrail/hooktrail.toml")
}

/// `None` when the config file [`resolve_path`] picks exists; else what to
/// tell the operator: every place looked at, in order, and how to pass one.
pub fn not_found(flag: Option<&Path>) -> Option<String> {
    let path = resolve_path(flag);
    if path.exists() {
        return None;
    }
    let env = std::env::var_os("HOOKTRAIL_CONFIG").filter(|p| !p.is_empty()).map(PathBuf::from);
    let place = |p: &Path| format!("{}: {}", p.display(), if p.exists() { "found" } else { "not found" });
    let skipped = |by: &str| format!("not consulted ({by} names the file)");
    let mut lines = vec![format!("config file `{}` not found. Looked at, in order:", path.display())];
    lines.push(format!("  {:<31} {}", "--config PATH", flag.map_or("not given".to_string(), place)));
    let env_line = match (&env, flag) {
        (_, Some(_)) => skipped("--config"),
        (Some(p), None) => place(p),
        (None, None) => "not set".to_string(),
    };
    lines.push(format!("  {:<31} {env_line}", "$HOOKTRAIL_CONFIG"));
    for default in ["./config/hooktrail.toml", "/etc/hooktrail/hooktrail.toml"] {
        let shown = match (flag, &env) {
            (Some(_), _) => skipped("--config"),
            (None, Some(_)) => skipped("$HOOKTRAIL_CONFIG"),
            (None, None) if Path::new(default).exists() => "found".to_string(),
            (None, None) => "not found".to_string(),
        };
        lines.push(format!("  {default:<31} {shown}"));
    }
    lines.push(
        "Pass one with `hooktrail --config PATH <command>` (or set HOOKTRAIL_CONFIG=PATH); \
         config/hooktrail.toml in the source tree is a commented starting point."
            .to_string(),
    );
    Some(lines.join("\n"))
}

/// Loads and validates the file at `path` with `HOOKTRAIL__…` overrides from the
/// process environment.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, env)
}

/// Like [`load`], with an explicit environment (used by tests and by `load`).
pub fn load_with_env(path: &Path, env: Vec<(String, String)>) -> Result<Loaded, ConfigErrors> {
    let env: HashMap<String, String> = env.into_iter().collect();
    let root = read(path, &env)?;
    let mut ck = Checker::new(Box::new(move |k| env.get(k).cloned()), base_dir(path));
    let config = build(&mut ck, root);
    if ck.problems.is_empty() {
        Ok(Loaded { config: Arc::new(config.expect("no problems means every section built")), warnings: ck.warnings })
    } else {
        Err(ConfigErrors(ck.problems, ck.warnings))
    }
}

/// Only the `[storage]` section, leniently: what the inspection commands need,
/// without requiring the daemon's secrets to be set in the operator's shell.
pub fn load_storage(path: &Path) -> Result<StorageConfig, ConfigErrors> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let root = read(path, &env)?;
    let mut ck = Checker::new(Box::new(|k| std::env::var(k).ok()), base_dir(path));
    let storage = storage::storage_config(&mut ck, root.get("storage").cloned());
    match storage {
        Some(s) if ck.problems.is_empty() => Ok(s),
        _ => Err(ConfigErrors(ck.problems, ck.warnings)),
    }
}

/// The file at `path` with the `HOOKTRAIL__SECTION__KEY` variables of `env`
/// laid over it, as one JSON tree.
fn read(path: &Path, env: &HashMap<String, String>) -> Result<Value, ConfigErrors> {
    if !path.exists() {
        return Err(ConfigErrors::one(format!("config file `{}` not found", path.display())));
    }
    let overrides: HashMap<String, String> =
        env.iter().filter(|(k, _)| k.starts_with("HOOKTRAIL__")).map(|(k, v)| (k.clone(), v.clone())).collect();
    ::config::Config::builder()
        .add_source(::config::File::from(path).format(::config::FileFormat::Toml))
        .add_source(
            ::config::Environment::with_prefix("HOOKTRAIL")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| ConfigErrors::one(format!("cannot read `{}`: {e}", path.display())))
}

/// Where relative `secret_file` paths are read from: the config file's directory.
fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn build(ck: &mut Checker, root: Value) -> Option<Config> {
    let Value::Object(mut top) = root else {
        ck.error("", "the config must be a TOML table");
        return None;
    };
    for key in top.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            match check::closest(key, &SECTIONS) {
                Some(near) => ck.error(key.clone(), format!("unknown key; did you mean `{near}`?")),
                None => ck.error(key.clone(), "unknown key"),
            }
        }
    }
    // A route naming a source or handler that is declared but invalid gets
    // no "no handler named" on top of that table's own problems.
    let declared = |section: &str| -> BTreeSet<String> {
        top.get(section).and_then(Value::as_object).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    };
    let declared = routes::Declared { sources: declared("sources"), handlers: declared("handlers") };
    let server = ck.section("server", top.remove("server")).and_then(|r| server::server_config(ck, r));
    let storage = storage::storage_config(ck, top.remove("storage"));
    let admin = ck.section("admin", top.remove("admin")).and_then(|r| server::admin_config(ck, r));
    let retry_raw = ck.section::<handlers::RawRetry>("retry", top.remove("retry"));
    let retry = retry_raw.as_ref().and_then(|r| handlers::retry_policy(ck, "retry", r, &RetryPolicy::default()));
    let processor = ck.section("processor", top.remove("processor")).and_then(|r| handlers::processor_config(ck, r));
    let sources = sources::sources(ck, top.remove("sources"));
    let handlers = handlers::handlers(ck, top.remove("handlers"), &retry.unwrap_or_default());
    let routes = routes::routes(ck, top.remove("routes"), &sources, &handlers, &declared);
    Some(Config {
        server: server?,
        storage: storage?,
        admin: admin?,
        retry: retry?,
        processor: processor?,
        sources,
        handlers,
        routes,
        secret_vars: ck.secret_vars.iter().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        load_with_env(&path, env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn problems(toml: &str, env: &[(&str, &str)]) -> Vec<String> {
        load_str(toml, env).unwrap_err().0.iter().map(|p| p.to_string()).collect()
    }

    const SOURCE: &str = "[sources.a]\nauth = { type = \"none\" }\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let l = load_str(SOURCE, &[]).unwrap();
        let c = &l.config;
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 1048576);
        assert_eq!(c.sources[0].path, "/hooks/a");
        assert_eq!(c.retry.max_attempts, 10);
        let db = c.storage.sqlite().expect("sqlite is the default backend");
        assert_eq!(db.path, Path::new("./data/hooktrail.db"));
        assert_eq!(db.min_free_bytes, storage::DEFAULT_MIN_FREE_BYTES);
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let p = problems(
            r#"
[server]
listen = "nope"
request_timeout = "5 parsecs"
bogus = 1
[sources.a]
path = "/a"
[sources.b]
auth = { type = "header_token", header = "X-T", secret_env = "MISSING_VAR" }
[sources.c]
auth = { type = "wat" }
[[routes]]
source = "zz"
handler = "h"
"#,
            &[],
        );
        let all = p.join("\n");
        assert!(all.contains("server.bogus: unknown key"), "{all}");
        assert!(all.contains("server.request_timeout: invalid duration `5 parsecs`"), "{all}");
        assert!(all.contains("sources.a.auth: is required"), "{all}");
        assert!(all.contains("sources.b.auth.secret_env: environment variable `MISSING_VAR` is not set"), "{all}");
        assert!(all.contains("sources.c.auth.type: unknown auth type `wat`"), "{all}");
        assert!(all.contains("routes[0].source: no source named `zz`"), "{all}");
        assert!(all.contains("routes[0].handler: no handler named `h`"), "{all}");
    }

    #[test]
    fn listen_error_reported_even_when_other_sections_are_bad() {
        let p = problems("[server]\nlisten = \"nope\"\n", &[]);
        assert!(p.iter().any(|l| l.starts_with("server.listen: `nope`")), "{p:?}");
    }

    #[test]
    fn env_overrides_nested_keys() {
        let l = load_str(SOURCE, &[("HOOKTRAIL__SERVER__LISTEN", "127.0.0.1:9999"), ("HOOKTRAIL__SERVER__MAX_BODY_BYTES", "77")]).unwrap();
        assert_eq!(l.config.server.listen.port(), 9999);
        assert_eq!(l.config.server.max_body_bytes, 77);
    }

    #[test]
    fn handler_env_keys_keep_their_case() {
        let l =
            load_str(&format!("{SOURCE}[handlers.h]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nenv = {{ EMAIL = \"/email\" }}\n"), &[])
                .unwrap();
        let HandlerKind::Shell(s) = &l.config.handlers["h"].kind else { panic!() };
        assert!(s.env.contains_key("EMAIL"));
    }

    #[test]
    fn inline_secret_warns() {
        let l = load_str("[sources.a]\nauth = { type = \"header_token\", header = \"X-T\", secret = \"s3\" }\n", &[]).unwrap();
        assert!(l.warnings.iter().any(|w| w.path == "sources.a.auth.secret"));
        assert!(!format!("{:?}", l.config).contains("s3\""));
    }

    #[test]
    fn handler_keys_shared_by_every_type_still_apply() {
        let l = load_str(
            &format!("{SOURCE}[retry]\nmax_attempts = 3\n[handlers.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\ntimeout = \"2s\"\nconcurrency = 7\nmax_backoff = \"20s\"\n"),
            &[],
        )
        .unwrap();
        let h = &l.config.handlers["h"];
        assert_eq!((h.timeout.as_secs(), h.concurrency, h.retry.max_attempts, h.retry.max_backoff.as_secs()), (2, 7, 3, 20));
    }

    #[test]
    fn a_bad_shared_value_and_a_foreign_key_are_both_reported() {
        let p =
            problems(&format!("{SOURCE}[handlers.h]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\ntimeout = \"soon\"\nurl = \"x\"\n"), &[]);
        assert!(p.iter().any(|l| l.starts_with("handlers.h.timeout: invalid duration `soon`")), "{p:?}");
        assert!(p.iter().any(|l| l.starts_with("handlers.h.url: not a key of a shell handler (keys: type, command,")), "{p:?}");
    }

    #[test]
    fn a_missing_or_unknown_handler_type_is_named_and_nothing_else_guessed() {
        let p = problems(&format!("{SOURCE}[handlers.h]\nurl = \"x\"\n[handlers.g]\ntype = \"ftp\"\nurl = \"x\"\n"), &[]);
        assert_eq!(
            p,
            [
                "handlers.g.type: unknown handler type `ftp`; expected shell, http or crm_upsert",
                "handlers.h.type: is required: shell, http or crm_upsert"
            ]
        );
    }

    #[test]
    fn postgres_storage_reads_its_url_from_the_environment_and_keeps_it_secret() {
        let url = "postgres://hooktrail:pa55word@db.internal/hooktrail";
        let l = load_str(&format!("[storage]\nbackend = \"postgres\"\nurl_env = \"PG_URL\"\n{SOURCE}"), &[("PG_URL", url)]).unwrap();
        let Backend::Postgres(pg) = &l.config.storage.backend else { panic!("{:?}", l.config.storage) };
        assert_eq!(pg.url.expose(), url.as_bytes());
        assert!(l.config.secret_vars.contains(&"PG_URL".to_string()), "kept out of handler environments");
        assert!(!format!("{:?}", l.config).contains("pa55word"));
        assert!(!l.warnings.iter().any(|w| w.path == "storage.backend"), "built: no warning: {:?}", l.warnings);

        let p = problems(&format!("[storage]\nbackend = \"postgres\"\nurl_env = \"PG_URL\"\n{SOURCE}"), &[("PG_URL", "pa55word")]);
        assert_eq!(p, ["storage.url_env: environment variable `PG_URL` does not hold a postgres:// or postgresql:// URL"]);
    }
}
