//! Value shapes several sections share: durations, rate limits, secret
//! references and address ranges. A leaf: it imports nothing else of the
//! config, so every concern's module may use it.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// A duration written as `"500ms"`, `"30s"`, `"12h"`, `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// The longest duration a key takes: 1000 years (of 365.25 days, as
/// humantime counts them). Each is added to the clock somewhere (a lease, a
/// dedup window, max_age), and the sum must still be a date.
pub const MAX_DURATION: Duration = Duration::from_secs(1000 * 31_557_600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor)
    }
}

/// Reads a duration string; a bare number (`request_timeout = 30`) is
/// refused with the string to write instead, since its unit is a guess.
struct DurVisitor;

impl DurVisitor {
    fn number<E: serde::de::Error>(n: impl std::fmt::Display) -> E {
        E::custom(format!("a duration is a string with a unit: write \"{n}s\" (or \"{n}ms\", \"{n}m\"), not {n}"))
    }
}

impl serde::de::Visitor<'_> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration string like \"30s\"")
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| E::custom(format!("invalid duration `{s}` ({e}); write e.g. \"500ms\", \"30s\", \"12h\"")))?;
        if d > MAX_DURATION {
            return Err(E::custom(format!("duration `{s}` is longer than 1000 years")));
        }
        Ok(Dur(d))
    }
    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Dur, E> {
        Err(Self::number(n))
    }
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dur, E> {
        Err(Self::number(n))
    }
    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Dur, E> {
        Err(Self::number(n))
    }
}

/// A token bucket: `per_second` refill, `burst` capacity. Inbound for a
/// source, outbound for an http or crm_upsert handler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The governor quota, for inbound (ingest) and outbound (handler) limiters alike.
    pub fn quota(&self) -> governor::Quota {
        let per = std::num::NonZeroU32::new(self.per_second).expect("validated: per_second >= 1");
        let burst = std::num::NonZeroU32::new(self.burst).expect("validated: burst >= 1");
        governor::Quota::per_second(per).allow_burst(burst)
    }
}

/// `rate_limit = { per_second, burst }` as written.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawRate {
    pub per_second: Option<u32>,
    pub burst: Option<u32>,
}

/// One secret as written: exactly one of the three keys (README "Configuration").
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub(super) struct RawSecretRef {
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret: Option<String>,
}

impl RawSecretRef {
    /// Whether any of the single-secret keys was written.
    pub fn is_given(&self) -> bool {
        self.secret_env.is_some() || self.secret_file.is_some() || self.secret.is_some()
    }
}

/// One secret, or a rotation list of them (`secrets = [...]`), as every
/// table that verifies or signs with a secret writes it. Not flattened into
/// those tables: a flattened struct hides the table's unknown keys.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawSecrets {
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret: Option<String>,
    pub secrets: Option<Vec<RawSecretRef>>,
}

impl RawSecrets {
    /// The single form (`secret_env`, `secret_file` or `secret`).
    pub fn single(&self) -> RawSecretRef {
        RawSecretRef { secret_env: self.secret_env.clone(), secret_file: self.secret_file.clone(), secret: self.secret.clone() }
    }
}

/// `10.0.0.0/8`, or a bare address meaning just that host.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}
