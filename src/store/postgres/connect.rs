//! Reaching the database: the libpq-style URL read into a driver config
//! (with the `sslmode` values tokio-postgres does not know), rustls for TLS,
//! and the driver's errors turned into [`StoreError`]s.
//!
//! The URL carries the password. Nothing here ever formats the URL or the
//! driver config into a message: errors name the variable it came from
//! (`storage.url_env`) and what is wrong, never the value.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use tokio_postgres::config::SslMode;

use crate::store::StoreError;

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The config key problems with the URL are reported under.
const URL_KEY: &str = "storage.url_env";

/// What TLS the URL asks for (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`: plain TCP (or a Unix socket).
    Disable,
    /// `prefer` (libpq's default): TLS when the server offers it, the
    /// certificate unchecked, as libpq does.
    Prefer,
    /// `require`: TLS or nothing; the certificate is not checked (libpq).
    Require,
    /// `verify-full`: TLS, a certificate chaining to `sslrootcert` (or the
    /// Mozilla roots) and naming the host.
    VerifyFull,
}

/// A URL read for the driver: its config and the TLS to use.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub mode: TlsMode,
}

/// Reads the URL held in `url_env`. Errors name the variable, never the value.
pub fn target(url: &str, url_env: &str) -> Result<Target, String> {
    let bad = |what: String| format!("{URL_KEY}: the URL in `{url_env}` {what}");
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| bad("has a query string that is not key=value pairs".into()))?;
    let (mut mode, mut root_file) = (TlsMode::Prefer, None);
    let mut rest = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "sslmode" => {
                mode = match v.as_str() {
                    "disable" => TlsMode::Disable,
                    "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-full" => TlsMode::VerifyFull,
                    other => return Err(bad(format!("has sslmode={other}; expected disable, prefer, require or verify-full"))),
                }
            }
            "sslrootcert" => root_file = Some(v),
            _ => rest.push((k, v)),
        }
    }
    let rest = serde_urlencoded::to_string(&rest).map_err(|e| bad(format!("cannot be rewritten: {e}")))?;
    let driver_url = if rest.is_empty() { base.to_string() } else { format!("{base}?{rest}") };
    let mut config: tokio_postgres::Config =
        driver_url.parse().map_err(|e: tokio_postgres::Error| bad(format!("is not a valid postgres:// URL ({})", parse_problem(&e))))?;
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyFull => SslMode::Require,
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("hooktrail");
    }
    // A peer that vanished (a failed-over primary) is noticed in seconds, not hours.
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let tls = tls_config(mode, root_file.as_deref()).map_err(bad)?;
    Ok(Target { config, tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls), mode })
}

/// What `check-config` says of the URL in `cfg`: every problem [`target`]
/// would refuse at start (an unknown `sslmode`, a URL the driver cannot
/// read, an unreadable `sslrootcert`), without connecting. Like every
/// message here, it names the variable and the key, never the URL.
pub fn check_url(cfg: &crate::config::PostgresConfig) -> Result<(), crate::config::Problem> {
    let url = String::from_utf8_lossy(cfg.url.expose()).into_owned();
    target(&url, &cfg.url_env).map(drop).map_err(|e| {
        let message = e.strip_prefix(URL_KEY).and_then(|m| m.strip_prefix(": ")).unwrap_or(&e).to_string();
        crate::config::Problem { path: URL_KEY.to_string(), message }
    })
}

/// The driver's reason a URL does not parse, with the key it names (its
/// cause, e.g. "invalid value for parameter `port`"): the driver's causes
/// name keys, never values, so the password cannot be in it.
fn parse_problem(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn tls_config(mode: TlsMode, root_file: Option<&str>) -> Result<rustls::ClientConfig, String> {
    // ring, the provider reqwest's rustls already uses: one crypto backend.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("needs TLS, and no TLS version is usable: {e}"))?;
    if mode != TlsMode::VerifyFull {
        // libpq checks no certificate below verify-ca; neither do we.
        return Ok(builder.dangerous().with_custom_certificate_verifier(Arc::new(Unverified(provider))).with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("names sslrootcert `{path}`, which cannot be read as PEM certificates: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("names sslrootcert `{path}`, which holds no usable certificate"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// sslmode `prefer`/`require`: encrypted, the certificate taken as it is
/// (libpq's meaning of those modes); signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// SQLSTATE classes that mean "the database cannot serve right now", not
/// "this statement is wrong": connection exceptions (08), insufficient
/// resources (53), operator intervention (57: shutdown, cannot connect now),
/// system errors (58), and the retryable conflicts (40: serialization
/// failure, deadlock).
fn is_transient(code: &str) -> bool {
    ["08", "53", "57", "58", "40"].iter().any(|class| code.starts_with(class))
}

/// The driver's error as callers see it (see [`StoreError`]). Its text
/// never holds the URL: the driver does not know it as text.
pub fn neutral(e: tokio_postgres::Error) -> StoreError {
    // The driver's own text for a server error is just "db error"; the
    // server's message says what is wrong (it never holds the password).
    let message = match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    };
    match e.as_db_error() {
        Some(db) if is_transient(db.code().code()) => StoreError::Unavailable(message),
        Some(db) if db.code().code().starts_with("23") => StoreError::Conflict(message),
        Some(db) if db.code() == &tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
            StoreError::Corrupt(format!("{message}: the database has no hooktrail schema (start `hooktrail serve` once)"))
        }
        Some(_) => StoreError::Backend(message),
        // Reading a column back as its type failed: stored data we cannot read.
        None if message.starts_with("error deserializing") => StoreError::Corrupt(message),
        // A value this version could not send: a bug here, not the database away.
        None if message.starts_with("error serializing") => StoreError::Backend(message),
        // Connecting, I/O, a closed connection, TLS: the database is out of reach.
        None => StoreError::Unavailable(message),
    }
}

/// Whether a failed transaction may simply be run again (a deadlock or
/// serialization failure between nodes).
pub fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "40001" || c.code() == "40P01")
}

/// A pool's error as callers see it.
pub fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError as P;
    match e {
        P::Backend(e) => neutral(e),
        P::Closed => StoreError::ShuttingDown,
        P::Timeout(_) => StoreError::Unavailable("no database connection became free in time".into()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_libpq_knows_are_read_and_others_are_named() {
        for (mode, want) in [
            ("disable", TlsMode::Disable),
            ("prefer", TlsMode::Prefer),
            ("require", TlsMode::Require),
            ("verify-full", TlsMode::VerifyFull),
        ] {
            let t = target(&format!("postgres://u:pw@db.internal/app?sslmode={mode}&target_session_attrs=read-write"), "DB").expect(mode);
            assert_eq!(t.mode, want);
            assert_eq!(t.config.get_dbname(), Some("app"));
        }
        let t = target("postgres://u:pw@db.internal/app", "DB").expect("no query");
        assert_eq!(t.mode, TlsMode::Prefer, "libpq's default");
        let e = target("postgres://u:s3cret@db/app?sslmode=verify-ca", "DB").err().expect("refused");
        assert!(e.contains("sslmode=verify-ca") && e.contains("`DB`") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn several_hosts_and_read_write_sessions_are_understood() {
        let t =
            target("postgresql://u:pw@db1:5432,db2:5433/app?target_session_attrs=read-write&sslmode=disable", "DB").expect("multi-host");
        assert_eq!(t.config.get_hosts().len(), 2);
        assert_eq!(t.config.get_ports(), [5432, 5433]);
        assert_eq!(t.config.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        for url in ["postgres://u:s3cret@db:notaport/app", "postgres://u:s3cret@db/app?connect_timeout=soon"] {
            let e = target(url, "HOOKTRAIL_DATABASE_URL").err().expect("refused");
            assert!(e.contains("`HOOKTRAIL_DATABASE_URL`") && !e.contains("s3cret"), "{e}");
        }
    }
}
