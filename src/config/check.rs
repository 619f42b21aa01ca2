//! Validation with key paths: the [`Checker`] every concern's module feeds
//! its problems to, so that loading never stops at the first one and
//! `check-config` can list them all. Also how a table's unknown keys and
//! badly typed values are found and named.
//!
//! A leaf of the config: it knows the shared value shapes (`values`) and
//! nothing of servers, sources, handlers or routes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::values::{parse_cidr, RateLimit, RawRate, RawSecretRef, RawSecrets};
use crate::crypto::Secret;

/// One problem found while loading, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration (never empty), and the warnings
/// found alongside, so `check-config` can print both.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in configuration:\n  {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigErrors(pub Vec<Problem>, pub Vec<Problem>);

impl ConfigErrors {
    pub(super) fn one(message: String) -> Self {
        ConfigErrors(vec![Problem { path: String::new(), message }], Vec::new())
    }
    /// Warnings found alongside the problems.
    pub fn warnings(&self) -> &[Problem] {
        &self.1
    }
}

/// Looks up environment variables; a parameter so tests need not mutate the process env.
pub(super) type EnvLookup = Box<dyn Fn(&str) -> Option<String>>;

/// Collects problems and warnings while validating.
pub(super) struct Checker {
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
    /// Every environment variable read for a secret.
    pub secret_vars: BTreeSet<String>,
    env: EnvLookup,
    /// Relative `secret_file` paths are read from here (the config file's directory).
    pub base_dir: PathBuf,
}

impl Checker {
    /// A checker reading variables through `env`; relative files resolve against `base_dir` (the config file's directory).
    pub fn new(env: EnvLookup, base_dir: PathBuf) -> Self {
        Checker { problems: Vec::new(), warnings: Vec::new(), secret_vars: BTreeSet::new(), env, base_dir }
    }

    /// Reads an environment variable that holds a secret, remembering its name.
    pub fn secret_var(&mut self, var: &str) -> Option<String> {
        self.secret_vars.insert(var.to_string());
        (self.env)(var)
    }

    /// Records a problem. A key already reported (say, `auth` with a wrong
    /// type) is not reported again by a later check (say, "auth is required").
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let already = self.problems.iter().any(|p| p.path == path || p.path.starts_with(&format!("{path}.")));
        if already && !path.is_empty() {
            return;
        }
        self.problems.push(Problem { path, message: message.into() });
    }

    /// The value `given` names among `choices`; anything else is reported at
    /// `path` as "`x` is not one of {listed}".
    pub fn one_of<T: Copy>(&mut self, path: String, given: &str, choices: &[(&str, T)], listed: &str) -> Option<T> {
        let found = choices.iter().find(|(name, _)| *name == given).map(|(_, v)| *v);
        if found.is_none() {
            self.error(path, format!("`{given}` is not one of {listed}"));
        }
        found
    }

    /// Records something worth saying that does not stop the config from loading (an inline secret).
    pub fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem { path: path.into(), message: message.into() });
    }

    /// Deserializes one subtree, recording unknown keys and type errors with their path.
    pub fn section<T: DeserializeOwned + Default>(&mut self, prefix: &str, value: Option<Value>) -> Option<T> {
        let Some(value) = value else { return Some(T::default()) };
        self.deserialize(prefix, value, |_| "unknown key".to_string())
    }

    /// Splits a table whose `tag` key names its kind (a handler's `type`,
    /// storage's `backend`) into the tag's value, the keys every kind shares
    /// (those of `S`), and the rest, which [`Checker::kind_section`] checks
    /// against the kind's own keys. `None` (reported) when it is no table or
    /// the tag is no string.
    pub fn split_tagged<S: DeserializeOwned>(&mut self, prefix: &str, value: Value, tag: &str) -> Option<Tagged> {
        let Value::Object(mut own) = value else {
            self.error(prefix, "must be a table");
            return None;
        };
        let kind = match own.remove(tag) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.error(join(prefix, tag), format!("must be a string, not `{other}`"));
                return None;
            }
        };
        let shared_keys = keys_of::<S>();
        let shared = own.keys().filter(|k| shared_keys.contains(&k.as_str())).cloned().collect::<Vec<_>>();
        let shared = shared.into_iter().filter_map(|k| own.remove_entry(&k)).collect();
        Some(Tagged { kind, shared, own })
    }

    /// Deserializes the kind-specific keys of a tagged table as `T`. A key
    /// that is not this kind's is most often one of another kind (a `url` on
    /// a shell handler): it is reported as "not a key of {what}" with the
    /// keys this kind takes, so the reader sees what they mixed up.
    pub fn kind_section<T: DeserializeOwned + Default>(
        &mut self,
        prefix: &str,
        own: Map<String, Value>,
        what: &str,
        tag: &str,
        shared: &[&str],
    ) -> Option<T> {
        let keys: Vec<&str> = std::iter::once(tag).chain(keys_of::<T>().iter().copied()).chain(shared.iter().copied()).collect();
        let not_ours = format!("not a key of {what} (keys: {})", keys.join(", "));
        self.deserialize(
            prefix,
            Value::Object(own),
            |key| if key.contains(['.', '[']) { "unknown key".to_string() } else { not_ours.clone() },
        )
    }

    /// The work of [`Checker::section`]; `unknown` says what to report for an
    /// unknown key, given its path inside the table.
    fn deserialize<T: DeserializeOwned>(&mut self, prefix: &str, value: Value, unknown: impl Fn(&str) -> String) -> Option<T> {
        let whole = value.clone();
        let mut ignored = Vec::new();
        let mut note = |p: serde_ignored::Path| ignored.push(key_path(&p));
        let de = serde_ignored::Deserializer::new(value, &mut note);
        let result: Result<T, _> = serde_path_to_error::deserialize(de);
        if !ignored.is_empty() {
            let tables = table_keys::<T>();
            for key in ignored {
                let mut message = unknown(&key);
                if let Some(near) = suggestion(&key, &tables) {
                    message.push_str(&format!("; did you mean `{near}`?"));
                }
                self.error(join(prefix, &key), message);
            }
        }
        let Err(first) = result else { return result.ok() };
        let Value::Object(map) = whole else {
            self.type_error(prefix, first);
            return None;
        };
        // Report every bad key of the table, not just the first, then build
        // the table from its good keys so its other checks still run.
        let mut good = Map::new();
        for (k, v) in map {
            let single = Value::Object(Map::from_iter([(k.clone(), v.clone())]));
            match serde_path_to_error::deserialize::<_, T>(single) {
                Ok(_) => {
                    good.insert(k, v);
                }
                Err(e) => self.type_error(prefix, e),
            }
        }
        serde_json::from_value(Value::Object(good)).ok()
    }

    fn type_error(&mut self, prefix: &str, e: serde_path_to_error::Error<serde_json::Error>) {
        let inner = e.path().to_string();
        let path = if inner == "." { prefix.to_string() } else { join(prefix, &inner) };
        self.error(path, e.into_inner().to_string());
    }

    /// Resolves one secret reference; `None` (reported) when it names
    /// nothing usable, and also when it is absent (the caller decides
    /// whether that is a problem).
    pub fn secret(&mut self, path: &str, r: &RawSecretRef) -> Option<Secret> {
        let given = [r.secret_env.is_some(), r.secret_file.is_some(), r.secret.is_some()].iter().filter(|b| **b).count();
        if given > 1 {
            self.error(path, "give only one of secret_env, secret_file, secret");
            return None;
        }
        if let Some(var) = &r.secret_env {
            return match self.secret_var(var) {
                Some(v) if !v.is_empty() => Some(Secret::new(v.into_bytes())),
                _ => {
                    self.error(join(path, "secret_env"), format!("environment variable `{var}` is not set"));
                    None
                }
            };
        }
        if let Some(file) = &r.secret_file {
            let file = self.base_dir.join(file);
            return match std::fs::read(&file) {
                Ok(mut bytes) => {
                    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        bytes.pop();
                    }
                    if bytes.is_empty() {
                        self.error(join(path, "secret_file"), format!("`{}` is empty", file.display()));
                        None
                    } else {
                        Some(Secret::new(bytes))
                    }
                }
                Err(e) => {
                    self.error(join(path, "secret_file"), format!("cannot read `{}`: {e}", file.display()));
                    None
                }
            };
        }
        if let Some(s) = &r.secret {
            self.warn(join(path, "secret"), "inline secret in the config file; prefer secret_env or secret_file");
            if s.is_empty() {
                self.error(join(path, "secret"), "is empty");
                return None;
            }
            return Some(Secret::new(s.as_bytes().to_vec()));
        }
        None
    }

    /// The single form or the `secrets = [...]` rotation list; at least one required.
    pub fn secrets(&mut self, path: &str, r: &RawSecrets) -> Vec<Secret> {
        let single = r.single();
        match &r.secrets {
            Some(list) => {
                if single.is_given() {
                    self.error(path, "give either secrets = [...] or one secret_env/secret_file/secret, not both");
                }
                if list.is_empty() {
                    self.error(join(path, "secrets"), "is empty");
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        let p = format!("{}[{i}]", join(path, "secrets"));
                        let s = self.secret(&p, r);
                        if s.is_none() && !r.is_given() {
                            self.error(p, "needs secret_env, secret_file or secret");
                        }
                        s
                    })
                    .collect()
            }
            None if single.is_given() => self.secret(path, &single).into_iter().collect(),
            None => {
                self.error(join(path, "secret_env"), "a secret is required (secret_env, secret_file, secret or secrets = [...])");
                Vec::new()
            }
        }
    }

    /// A `{ per_second, burst }` table: both positive, burst defaulting to per_second.
    pub fn rate(&mut self, path: &str, r: &RawRate) -> Option<RateLimit> {
        let Some(per_second) = r.per_second else {
            self.error(join(path, "per_second"), "is required");
            return None;
        };
        if per_second == 0 {
            self.error(join(path, "per_second"), "must be at least 1");
            return None;
        }
        let burst = r.burst.unwrap_or(per_second);
        if burst == 0 {
            self.error(join(path, "burst"), "must be at least 1");
            return None;
        }
        Some(RateLimit { per_second, burst })
    }

    /// `false` (reported) unless `p` is a JSON pointer; `""` is one (the whole document).
    pub fn pointer(&mut self, path: &str, p: &str) -> bool {
        if !p.is_empty() && !p.starts_with('/') {
            self.error(path, format!("`{p}` is not a JSON pointer (it must start with `/`, e.g. \"/email\")"));
            return false;
        }
        true
    }

    /// Parses a list of CIDRs (a bare address is a /32 or /128), reporting each bad one by index.
    pub fn cidrs(&mut self, path: &str, list: &[String]) -> Vec<IpNet> {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| match parse_cidr(s) {
                Some(n) => Some(n),
                None => {
                    self.error(format!("{path}[{i}]"), format!("`{s}` is not an IP address or CIDR"));
                    None
                }
            })
            .collect()
    }
}

/// A tagged table taken apart by [`Checker::split_tagged`].
pub(super) struct Tagged {
    /// The tag's value; `None` when the key is absent.
    pub kind: Option<String>,
    /// The keys every kind takes.
    pub shared: Map<String, Value>,
    /// Everything else: the kind's own keys, or keys that are not its.
    pub own: Map<String, Value>,
}

/// `prefix.key`, where either may be empty.
pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// An ignored key's path in the style of every other message: `a.b[0].c`,
/// without serde_ignored's `?` for an `Option` it passed through.
fn key_path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => join(&key_path(parent), key),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// The known key of the table holding `key` (a path like `dedup.windw`)
/// that `key` most likely misspells, if one is close enough.
fn suggestion(key: &str, tables: &BTreeMap<String, &'static [&'static str]>) -> Option<&'static str> {
    let (table, last) = match key.rsplit_once('.') {
        Some((table, last)) => (normalize_indexes(table), last),
        None => (String::new(), key),
    };
    let known = tables.get(&table)?;
    closest(last, known)
}

/// The candidate closest to `word`, when it is close enough to be a typo
/// (Jaro-Winkler similarity of 0.8 or more: `windw` → `window`, not `url` → `type`).
pub(super) fn closest(word: &str, candidates: &[&'static str]) -> Option<&'static str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, c)| *score >= 0.8 && *c != word)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `match[3].x` → `match[].x`: every item of a list has the same keys.
fn normalize_indexes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The keys of every table a raw struct holds, by their path inside it
/// (`""` for the struct itself, `dedup`, `match[]`), read from the derived
/// `Deserialize` impls so suggestions never drift from the structs.
pub(super) fn table_keys<T: DeserializeOwned>() -> BTreeMap<String, &'static [&'static str]> {
    let mut probe = TreeProbe::default();
    // A field whose probe value its type refuses ends that struct's visit;
    // skip it and look again (every raw struct is `#[serde(default)]`).
    for _ in 0..64 {
        let failed = probe.failed.len();
        let _ = T::deserialize(TreeDe { probe: &mut probe, path: String::new(), depth: 0 });
        if probe.failed.len() == failed {
            break;
        }
    }
    probe.tables
}

#[derive(Default)]
struct TreeProbe {
    tables: BTreeMap<String, &'static [&'static str]>,
    /// Field paths whose probe value was refused; left out of later visits.
    failed: BTreeSet<String>,
}

/// A deserializer that offers every struct all of its fields, with a
/// harmless value for each (`"0s"` for a string, so durations parse),
/// recording each struct's field names under its path.
struct TreeDe<'a> {
    probe: &'a mut TreeProbe,
    path: String,
    depth: usize,
}

type ProbeError = serde::de::value::Error;

impl<'de> serde::Deserializer<'de> for TreeDe<'_> {
    type Error = ProbeError;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_str("0s")
    }
    fn deserialize_u64<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_u64(0)
    }
    fn deserialize_u32<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_u64(0)
    }
    fn deserialize_u16<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_u64(0)
    }
    fn deserialize_i64<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_u64(0)
    }
    fn deserialize_i32<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_u64(0)
    }
    fn deserialize_bool<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_bool(false)
    }
    fn deserialize_f64<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_f64(0.0)
    }
    fn deserialize_str<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_str("0s")
    }
    fn deserialize_string<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_str("0s")
    }
    fn deserialize_option<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_some(self)
    }
    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, ProbeError> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        if self.depth > 8 {
            return v.visit_seq(serde::de::value::SeqDeserializer::<std::iter::Empty<()>, ProbeError>::new(std::iter::empty()));
        }
        let path = format!("{}[]", self.path);
        v.visit_seq(OneItem { probe: Some(self.probe), path, depth: self.depth + 1 })
    }
    fn deserialize_map<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, ProbeError> {
        v.visit_map(serde::de::value::MapDeserializer::<std::iter::Empty<((), ())>, ProbeError>::new(std::iter::empty()))
    }
    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, ProbeError> {
        self.probe.tables.insert(self.path.clone(), fields);
        if self.depth > 8 {
            return Err(serde::de::Error::custom("too deep"));
        }
        let fields = fields.iter().copied().filter(|f| !self.probe.failed.contains(&join(&self.path, f))).collect();
        v.visit_map(Fields { probe: self.probe, path: self.path, depth: self.depth + 1, fields, next: 0 })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i128 u8 u128 f32 char bytes byte_buf unit
        unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// A list of one item, probed under `path` (`match[]`).
struct OneItem<'a> {
    probe: Option<&'a mut TreeProbe>,
    path: String,
    depth: usize,
}

impl<'de> serde::de::SeqAccess<'de> for OneItem<'_> {
    type Error = ProbeError;
    fn next_element_seed<S: serde::de::DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, ProbeError> {
        let Some(probe) = self.probe.take() else { return Ok(None) };
        seed.deserialize(TreeDe { probe, path: self.path.clone(), depth: self.depth }).map(Some)
    }
}

/// A struct's fields, each with a probed value.
struct Fields<'a> {
    probe: &'a mut TreeProbe,
    path: String,
    depth: usize,
    fields: Vec<&'static str>,
    next: usize,
}

impl<'de> serde::de::MapAccess<'de> for Fields<'_> {
    type Error = ProbeError;
    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ProbeError> {
        let Some(field) = self.fields.get(self.next) else { return Ok(None) };
        seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(field)).map(Some)
    }
    fn next_value_seed<S: serde::de::DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, ProbeError> {
        let path = join(&self.path, self.fields[self.next]);
        self.next += 1;
        let result = seed.deserialize(TreeDe { probe: &mut *self.probe, path: path.clone(), depth: self.depth });
        if result.is_err() {
            self.probe.failed.insert(path);
        }
        result
    }
}

/// The keys a raw struct takes, as its derived `Deserialize` names them
/// (renames applied), so the key lists in messages never drift from the
/// structs. Empty for a struct with a `#[serde(flatten)]` field, which
/// deserializes as a map; [`Checker::kind_section`] is not used with those.
pub(super) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut keys: &'static [&'static str] = &[];
    // The probe errors out either way; only what it saw matters.
    let _ = T::deserialize(KeyProbe(&mut keys));
    keys
}

/// A deserializer that only records the field names a struct asks for.
struct KeyProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for KeyProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("keys recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Shared {
        timeout: Option<u32>,
    }

    #[derive(serde::Deserialize, Default, Debug)]
    #[serde(default)]
    struct Own {
        command: Option<Vec<String>>,
        #[serde(rename = "match")]
        rate: Option<RawRateLike>,
    }

    #[derive(serde::Deserialize, Default, Debug)]
    #[serde(default)]
    struct RawRateLike {
        per_second: Option<u32>,
    }

    fn checker() -> Checker {
        Checker::new(Box::new(|_| None), PathBuf::new())
    }

    #[test]
    fn keys_of_lists_fields_as_written() {
        assert_eq!(keys_of::<Own>(), &["command", "match"]);
        assert_eq!(keys_of::<Shared>(), &["timeout"]);
    }

    #[test]
    fn a_key_of_another_kind_is_named_with_the_keys_of_this_one() {
        let mut ck = checker();
        let v = serde_json::json!({"type": "shell", "timeout": 5, "command": ["x"], "url": "u", "match": {"per_second": 1, "bogus": 2}});
        let t = ck.split_tagged::<Shared>("handlers.h", v, "type").unwrap();
        assert_eq!(t.kind.as_deref(), Some("shell"));
        assert!(t.shared.contains_key("timeout") && !t.own.contains_key("timeout"));
        let own: Own = ck.kind_section("handlers.h", t.own, "a shell handler", "type", keys_of::<Shared>()).unwrap();
        assert_eq!(own.command.as_deref(), Some(&["x".to_string()][..]));
        let got: Vec<String> = ck.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            ["handlers.h.match.bogus: unknown key", "handlers.h.url: not a key of a shell handler (keys: type, command, match, timeout)"]
        );
    }

    #[test]
    fn a_misspelt_nested_key_is_matched_against_its_own_table() {
        let tables = table_keys::<Own>();
        assert_eq!(tables[""], &["command", "match"]);
        assert_eq!(tables["match"], &["per_second"]);
        assert_eq!(suggestion("match.per_secnd", &tables), Some("per_second"));
        assert_eq!(suggestion("comand", &tables), Some("command"));
        assert_eq!(suggestion("url", &tables), None, "nothing close: no guess");
        assert_eq!(normalize_indexes("routes[3].match[12]"), "routes[].match[]");
    }

    #[test]
    fn a_tag_that_is_not_a_string_is_reported() {
        let mut ck = checker();
        assert!(ck.split_tagged::<Shared>("storage", serde_json::json!({"backend": 5}), "backend").is_none());
        assert_eq!(ck.problems[0].to_string(), "storage.backend: must be a string, not `5`");
    }
}
