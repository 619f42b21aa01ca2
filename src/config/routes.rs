//! `[[routes]]`: which handlers an event from a source goes to, and the
//! conditions on its payload that must all hold. Data only: ingest matches
//! them (`crate::ingest::routing`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::check::{join, Checker};
use super::handlers::HandlerConfig;
use super::sources::SourceConfig;

/// Events from `source` go to `handler` when every condition holds.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub source: String,
    pub handler: String,
    pub conditions: Vec<Condition>,
}

/// One `match` entry: a test of the value at a JSON pointer of the normalized payload.
#[derive(Debug, Clone)]
pub struct Condition {
    pub pointer: String,
    pub test: ConditionTest,
}

/// Exactly one test per condition; equality is loose about strings (README "Routes").
#[derive(Debug, Clone)]
pub enum ConditionTest {
    Equals(Value),
    Exists(bool),
    In(Vec<Value>),
    Regex(regex::Regex),
    Prefix(String),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRoute {
    source: Option<String>,
    handler: Option<String>,
    #[serde(rename = "match")]
    conditions: Vec<RawCondition>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCondition {
    pointer: Option<String>,
    equals: Option<Value>,
    exists: Option<bool>,
    #[serde(rename = "in")]
    one_of: Option<Vec<Value>>,
    regex: Option<String>,
    prefix: Option<String>,
}

/// The names of every `[sources.NAME]` and `[handlers.NAME]` table written,
/// valid or not.
pub(super) struct Declared {
    pub sources: BTreeSet<String>,
    pub handlers: BTreeSet<String>,
}

/// Checks every `[[routes]]` entry against the sources and handlers that loaded.
/// A name that is declared but did not load is already reported at its own
/// table; the route then fails without a second, misleading "no handler named".
pub(super) fn routes(
    ck: &mut Checker,
    value: Option<Value>,
    sources: &[Arc<SourceConfig>],
    handlers: &BTreeMap<String, Arc<HandlerConfig>>,
    declared: &Declared,
) -> Vec<RouteConfig> {
    let mut routes = Vec::new();
    match value {
        None => {}
        Some(Value::Array(list)) => {
            for (i, v) in list.into_iter().enumerate() {
                let p = format!("routes[{i}]");
                if let Some(raw) = ck.section::<RawRoute>(&p, Some(v)) {
                    if let Some(r) = route_config(ck, &p, raw, sources, handlers, declared) {
                        routes.push(r);
                    }
                }
            }
        }
        Some(_) => ck.error("routes", "must be an array of tables ([[routes]])"),
    }
    routes
}

fn route_config(
    ck: &mut Checker,
    p: &str,
    r: RawRoute,
    sources: &[Arc<SourceConfig>],
    handlers: &BTreeMap<String, Arc<HandlerConfig>>,
    declared: &Declared,
) -> Option<RouteConfig> {
    let before = ck.problems.len();
    let source = r.source.unwrap_or_default();
    let handler = r.handler.unwrap_or_default();
    // Set when the route names a declared source or handler that did not load.
    let mut broken_target = false;
    if source.is_empty() {
        ck.error(join(p, "source"), "is required");
    } else if !sources.iter().any(|s| s.name == source) {
        broken_target |= declared.sources.contains(&source);
        if !broken_target {
            ck.error(join(p, "source"), format!("no source named `{source}`"));
        }
    }
    if handler.is_empty() {
        ck.error(join(p, "handler"), "is required");
    } else if !handlers.contains_key(&handler) {
        if declared.handlers.contains(&handler) {
            broken_target = true;
        } else {
            ck.error(join(p, "handler"), format!("no handler named `{handler}`"));
        }
    }
    let mut conditions = Vec::new();
    for (i, c) in r.conditions.into_iter().enumerate() {
        let cp = format!("{p}.match[{i}]");
        let Some(pointer) = c.pointer else {
            ck.error(join(&cp, "pointer"), "is required");
            continue;
        };
        ck.pointer(&join(&cp, "pointer"), &pointer);
        let mut tests = Vec::new();
        if let Some(v) = c.equals {
            tests.push(ConditionTest::Equals(v));
        }
        if let Some(v) = c.exists {
            tests.push(ConditionTest::Exists(v));
        }
        if let Some(v) = c.one_of {
            tests.push(ConditionTest::In(v));
        }
        if let Some(v) = c.prefix {
            tests.push(ConditionTest::Prefix(v));
        }
        if let Some(v) = c.regex {
            match regex::Regex::new(&v) {
                Ok(re) => tests.push(ConditionTest::Regex(re)),
                Err(e) => ck.error(join(&cp, "regex"), format!("invalid regex: {e}")),
            }
        }
        if tests.len() != 1 && ck.problems.len() == before {
            ck.error(&cp, "needs exactly one of equals, exists, in, prefix, regex");
            continue;
        }
        if let Some(test) = tests.pop() {
            conditions.push(Condition { pointer, test });
        }
    }
    if ck.problems.len() > before || broken_target {
        return None;
    }
    Some(RouteConfig { source, handler, conditions })
}
