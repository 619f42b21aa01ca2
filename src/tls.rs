//! HTTPS on the public listener (README "HTTPS"): loading a certificate chain
//! and its private key from PEM files into a rustls server config, and the
//! holder the accept loop reads that config from for every new connection, so
//! a SIGHUP can swap the certificate without a restart.
//!
//! A leaf module: it imports nothing from the crate, so `config` (which
//! validates the files, at start, in `check-config` and on reload) and the
//! listener both use it. It must never block the runtime: files are read only
//! while a configuration is loaded, not per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate chain and its key are read from (`server.tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the private key of the first certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Which of the two files a problem is in, so messages can name the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

impl TlsFile {
    /// The config key under `server.tls`.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert_file",
            TlsFile::Key => "key_file",
        }
    }
}

/// A certificate or key that cannot be served, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub file: TlsFile,
    pub message: String,
}

impl TlsError {
    fn new(file: TlsFile, message: String) -> Self {
        TlsError { file, message }
    }
}

/// A certificate and key loaded and checked against each other, ready to
/// serve; `files` says where they came from.
#[derive(Clone)]
pub struct Loaded {
    pub files: TlsFiles,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("files", &self.files).finish_non_exhaustive()
    }
}

/// Reads both files and builds the rustls config: the chain must hold at
/// least one certificate, the key must parse and match the first certificate.
/// HTTP/1.1 only, like the listener (no ALPN `h2`).
pub fn load(files: TlsFiles) -> Result<Loaded, TlsError> {
    let chain = read_chain(&files.cert_file)?;
    let key = read_key(&files.key_file)?;
    // ring, the provider reqwest's rustls already uses: one crypto backend.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(TlsFile::Cert, format!("no usable TLS version: {e}")))?
        .with_no_client_auth();
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::new(
            TlsFile::Key,
            format!("`{}` is not the key of the certificate in `{}`", files.key_file.display(), files.cert_file.display()),
        ),
        e => TlsError::new(TlsFile::Key, format!("`{}` cannot be used with its certificate: {e}", files.key_file.display())),
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded { files, config: Arc::new(config) })
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::new(file, format!("cannot read `{}`: {e}", path.display())))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(TlsFile::Cert, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(TlsFile::Cert, format!("`{}` is not valid PEM: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(TlsError::new(TlsFile::Cert, format!("`{}` holds no PEM certificate", path.display())));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(TlsFile::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::new(TlsFile::Key, format!("`{}` holds no PEM private key", path.display())),
        e => TlsError::new(TlsFile::Key, format!("`{}` is not valid PEM: {e}", path.display())),
    })
}

/// The certificate the public listener serves, swapped whole on reload: a
/// handshake in progress keeps the config it started with, and every
/// connection accepted after the swap gets the new one.
pub struct Reloadable {
    current: ArcSwap<rustls::ServerConfig>,
}

impl Reloadable {
    pub fn new(loaded: Loaded) -> Arc<Self> {
        Arc::new(Reloadable { current: ArcSwap::new(loaded.config) })
    }

    /// Serves `loaded` to connections accepted from now on.
    pub fn replace(&self, loaded: Loaded) {
        self.current.store(loaded.config);
    }

    /// An acceptor for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// SIGHUP: the listener started with `running` (HTTPS or not) is given the
/// certificate of the reloaded config, `reloaded`. Whether the listener
/// speaks TLS at all is fixed when it binds, so adding or removing
/// `server.tls` waits for a restart (said in a warning).
pub fn reload(running: Option<&Reloadable>, reloaded: Option<&Loaded>) {
    match (running, reloaded) {
        (Some(r), Some(l)) => {
            r.replace(l.clone());
            tracing::info!(cert_file = %l.files.cert_file.display(), "SIGHUP: TLS certificate reloaded");
        }
        (Some(_), None) => tracing::warn!("SIGHUP: server.tls was removed; the listener serves HTTPS until a restart"),
        (None, Some(_)) => tracing::warn!("SIGHUP: server.tls was added; the listener serves plain HTTP until a restart"),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn each_unusable_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &made.cert.pem());
        let key = write(dir.path(), "key.pem", &made.key_pair.serialize_pem());
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let other_key = write(dir.path(), "other.pem", &other.key_pair.serialize_pem());
        let empty = write(dir.path(), "empty.pem", "");
        let load = |c: &PathBuf, k: &PathBuf| load(TlsFiles { cert_file: c.clone(), key_file: k.clone() });

        assert_eq!(load(&cert, &key).unwrap().files.cert_file, cert);
        let cases = [
            (&empty, &key, TlsFile::Cert, "holds no PEM certificate"),
            (&key, &key, TlsFile::Cert, "holds no PEM certificate"),
            (&dir.path().join("missing.pem"), &key, TlsFile::Cert, "cannot read"),
            (&cert, &empty, TlsFile::Key, "holds no PEM private key"),
            (&cert, &cert, TlsFile::Key, "holds no PEM private key"),
            (&cert, &other_key, TlsFile::Key, "is not the key of the certificate"),
        ];
        for (c, k, file, says) in cases {
            let e = load(c, k).unwrap_err();
            assert_eq!(e.file, file, "{c:?} {k:?}: {e}");
            assert!(e.message.contains(says), "{c:?} {k:?}: {e}");
        }
    }
}
