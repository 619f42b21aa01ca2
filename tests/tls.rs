//! HTTPS served directly (README "HTTPS"): `server.tls` with a self-signed
//! certificate made here, events stored over HTTPS, plain HTTP refused on the
//! TLS port, hyper's refusals still JSON inside TLS, the certificate swapped
//! on SIGHUP (and kept when the new file is bad), and `check-config` naming
//! a bad `server.tls` file.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SOURCE: &str = "[sources.a]\nauth = { type = \"none\" }\n";

/// A self-signed certificate for 127.0.0.1, as PEM, with its key.
struct SelfSigned {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn self_signed() -> SelfSigned {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("generating a self-signed certificate");
    SelfSigned { cert_pem: made.cert.pem(), key_pem: made.key_pair.serialize_pem(), der: made.cert.der().to_vec() }
}

/// Where the daemon reads its certificate and key from.
struct CertFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new(c: &SelfSigned) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for the certificate");
        let files = CertFiles { cert: dir.path().join("cert.pem"), key: dir.path().join("key.pem"), _dir: dir };
        files.write(c);
        files
    }

    fn write(&self, c: &SelfSigned) {
        std::fs::write(&self.cert, &c.cert_pem).expect("writing cert.pem");
        std::fs::write(&self.key, &c.key_pem).expect("writing key.pem");
    }

    /// The `[server]` line that points at these files.
    fn server_line(&self) -> String {
        tls_line(&self.cert, &self.key)
    }
}

fn tls_line(cert: &Path, key: &Path) -> String {
    format!("tls = {{ cert_file = {}, key_file = {} }}", toml_str(&cert.to_string_lossy()), toml_str(&key.to_string_lossy()))
}

/// A client that trusts `cert` and nothing else (no built-in roots), on a
/// fresh connection pool: each call makes new connections.
fn client_trusting(cert: &SelfSigned) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).expect("a PEM certificate"))
        .build()
        .expect("building an HTTPS client")
}

fn post_https(client: &reqwest::blocking::Client, d: &Daemon, body: &str) -> Result<(u16, String), reqwest::Error> {
    let r = client.post(format!("https://{}/hooks/a", d.addr)).header("content-type", "application/json").body(body.to_string()).send()?;
    let status = r.status().as_u16();
    Ok((status, r.text()?))
}

fn event_id(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {body}")).to_string()
}

#[test]
fn https_post_is_stored_and_plain_http_to_the_tls_port_stores_nothing() {
    let cert = self_signed();
    let files = CertFiles::new(&cert);
    let env = TestEnv::with_server(&files.server_line(), SOURCE);
    let d = env.start();

    let (status, body) = post_https(&client_trusting(&cert), &d, r#"{"lead":"over https"}"#).expect("HTTPS request");
    assert_eq!(status, 200, "{body}");
    let id = event_id(&body);
    let ev = env.show(&id);
    assert_eq!(ev["body"], r#"{"lead":"over https"}"#, "{ev}");
    assert_eq!(ev["source"], "a");

    // Plain HTTP on the HTTPS port never reaches ingest.
    let plain = d.request("POST", "/hooks/a").header("content-type", "application/json").body(r#"{"lead":"plain"}"#).try_send();
    assert!(plain.is_err(), "plain HTTP to the TLS port must fail, got {plain:?}");
    let events = env.events();
    assert_eq!(events.len(), 1, "only the HTTPS event is stored: {events:?}");
    assert_eq!(events[0]["id"], id.as_str());
}

/// hyper's own refusals are replaced by JSON inside TLS too: the wrapper
/// sees hyper's plaintext, under the TLS layer.
#[test]
fn a_malformed_head_over_tls_gets_the_json_400_and_stores_nothing() {
    let cert = self_signed();
    let files = CertFiles::new(&cert);
    let env = TestEnv::with_server(&files.server_line(), SOURCE);
    let d = env.start();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(cert.der.clone())).expect("adding the test root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client connection");
    let tcp = TcpStream::connect(d.addr).expect("connecting");
    tcp.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n").expect("writing over TLS");
    let mut answer = Vec::new();
    // The daemon closes after the refusal; an EOF without close_notify is fine here.
    let _ = tls.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(text.contains(r#"{"error":"request head is malformed"#), "{text}");
    assert!(env.events().is_empty(), "nothing stored");
}

/// A client that opens a connection and never completes the handshake holds
/// a connection slot only until `header_read_timeout`.
#[test]
fn a_stalled_tls_handshake_is_closed_after_header_read_timeout() {
    let cert = self_signed();
    let files = CertFiles::new(&cert);
    let env = TestEnv::with_server(&format!("header_read_timeout = \"1s\"\n{}", files.server_line()), SOURCE);
    let d = env.start();
    let mut s = d.connect(); // 15 s read timeout: far past the 1 s limit
    s.write_all(&[0x16, 0x03, 0x01]).expect("the first bytes of a ClientHello");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the daemon to close the stalled handshake, got {other:?}"),
    }
    let (status, body) = post_https(&client_trusting(&cert), &d, r#"{"after":"stall"}"#).expect("HTTPS still served");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn sighup_serves_the_replaced_certificate_to_new_connections_and_keeps_it_when_the_new_file_is_bad() {
    let first = self_signed();
    let second = self_signed();
    let files = CertFiles::new(&first);
    let env = TestEnv::with_server(&files.server_line(), SOURCE);
    let d = env.start();
    let (status, body) = post_https(&client_trusting(&first), &d, r#"{"n":1}"#).expect("HTTPS with the first certificate");
    assert_eq!(status, 200, "{body}");
    assert!(post_https(&client_trusting(&second), &d, r#"{"n":0}"#).is_err(), "the second certificate is not served yet");

    files.write(&second);
    signal(d.pid(), libc::SIGHUP);
    wait_for("the certificate reload", START_TIMEOUT, || d.log().contains("SIGHUP: TLS certificate reloaded"));
    let (status, body) = post_https(&client_trusting(&second), &d, r#"{"n":2}"#).expect("HTTPS with the second certificate");
    assert_eq!(status, 200, "{body}");
    let old = post_https(&client_trusting(&first), &d, r#"{"n":0}"#);
    assert!(old.is_err(), "a client trusting only the first certificate must fail now: {old:?}");

    // A bad file on reload: refused with its key path, the second certificate stays.
    std::fs::write(&files.cert, "not a certificate\n").expect("breaking cert.pem");
    signal(d.pid(), libc::SIGHUP);
    wait_for("the refused reload", START_TIMEOUT, || d.log().contains("configuration refused"));
    let log = d.log();
    assert!(log.contains("server.tls.cert_file"), "{log}");
    let (status, body) = post_https(&client_trusting(&second), &d, r#"{"n":3}"#).expect("HTTPS after a refused reload");
    assert_eq!(status, 200, "{body}");

    let mut stored: Vec<String> = env.events().iter().map(|e| e["payload"]["n"].to_string()).collect();
    stored.sort();
    assert_eq!(stored, ["1", "2", "3"], "exactly the three accepted events");
}

#[test]
fn check_config_names_a_missing_or_mismatched_tls_file_and_exits_1() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let missing = dir.path().join("nope.pem");
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n";
    let env = TestEnv::raw(&format!("{base}{}\n\n{SOURCE}", tls_line(&missing, &missing)));
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1, "{out:?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("server.tls.cert_file: cannot read"), "{all}");
    assert!(all.contains("nope.pem"), "{all}");

    // A key that is not the certificate's.
    let cert = self_signed();
    let other = self_signed();
    let files = CertFiles::new(&cert);
    std::fs::write(&files.key, &other.key_pem).expect("writing the wrong key");
    env.write_config(&format!("{base}{}\n\n{SOURCE}", files.server_line()));
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1, "{out:?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("server.tls.key_file:") && all.contains("is not the key of the certificate"), "{all}");

    // The right pair passes.
    files.write(&cert);
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
}
