//! What a client shows etcd: the CA it trusts etcd's certificate by, its own certificate, and its
//! user's password.
//!
//! The configuration ([`CommonConfig`]) names the files; they are read here, when a binary
//! connects to etcd (so the configuration stays a pure check of the variables, which the deploy
//! test runs with paths that exist only in a container). Every failure names the variable at
//! fault and says what the file must hold, on one line, e.g.
//! `ETCD_CA_FILE="/etc/etcd/ca.pem" is invalid: must be a readable file (No such file or
//! directory (os error 2))`. The password never leaves this module except into the etcd client:
//! it is not logged, not printed and not part of any `Debug` output.

use std::{path::Path, sync::Arc, time::Duration};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};

use crate::config::{CommonConfig, ConfigError, EtcdTls, EtcdUser};

/// The TLS settings and the user's password, read and checked.
pub struct Credentials {
    tls: Option<TlsOptions>,
    probe: Option<TlsProbe>,
    user: Option<(String, Password)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

/// A password, kept out of `Debug` and `Display`.
struct Password(String);

impl Credentials {
    /// Reads the files `config` names. Nothing configured gives empty credentials.
    pub fn load(config: &CommonConfig) -> Result<Self, ConfigError> {
        let tls = config.etcd_tls.as_ref().map(tls_options).transpose()?;
        let (tls, probe) = tls.map_or((None, None), |(options, probe)| (Some(options), probe));
        Ok(Credentials {
            tls,
            probe,
            user: config.etcd_user.as_ref().map(user).transpose()?,
        })
    }

    /// With a client certificate, a way to hear etcd's verdict on it ([`TlsProbe`]).
    pub fn client_tls_probe(&self) -> Option<TlsProbe> {
        self.probe.clone()
    }

    /// Does the client authenticate with a password (and so hold a token that can expire)?
    pub fn has_user(&self) -> bool {
        self.user.is_some()
    }

    /// `options` with TLS and the user added. With a user, the client renews its token when
    /// etcd reports it invalid (expired, or forgotten by a restarted etcd) and sends the
    /// refused request once more: see [`crate::etcd::connect`] for why that is safe.
    pub fn apply(self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = self.tls {
            options = options.with_tls(tls);
        }
        if let Some((name, Password(password))) = self.user {
            options = options.with_user(name, password).with_auto_token_refresh(true);
        }
        options
    }
}

fn tls_options(tls: &EtcdTls) -> Result<(TlsOptions, Option<TlsProbe>), ConfigError> {
    let ca = read("ETCD_CA_FILE", &tls.ca_file)?;
    let ca_certs = certificates("ETCD_CA_FILE", &tls.ca_file, &ca)?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    let mut probe = None;
    if let Some(client) = &tls.client {
        let cert = read("ETCD_CERT_FILE", &client.cert_file)?;
        let chain = certificates("ETCD_CERT_FILE", &client.cert_file, &cert)?;
        let key = read("ETCD_KEY_FILE", &client.key_file)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key).map_err(|err| {
            invalid(
                "ETCD_KEY_FILE",
                &client.key_file,
                format!("must be a PEM private key (PKCS#8, PKCS#1 or SEC1): {err}"),
            )
        })?;
        probe = TlsProbe::new(ca_certs, chain, private_key);
        options = options.identity(Identity::from_pem(cert, key));
    }
    Ok((options, probe))
}

/// A TLS client configured like the etcd client (the CA, the client certificate), used only to
/// learn why etcd closed a connection: etcd (Go's TLS) checks a client certificate after the
/// handshake and answers a refused one with an alert naming the cause (`UnknownCA`,
/// `CertificateExpired`), which a gRPC connection may miss when it notices the closed
/// connection first.
#[derive(Clone)]
pub struct TlsProbe {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsProbe").finish_non_exhaustive()
    }
}

/// How long the probe waits to connect and then for etcd's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl TlsProbe {
    /// `None` if rustls does not accept the pair (the etcd client then reports it).
    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Option<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(ca);
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .ok()?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .ok()?;
        Some(TlsProbe {
            config: Arc::new(config),
        })
    }

    /// Shakes hands with the first endpoint that accepts a TCP connection and waits for etcd's
    /// first word; returns the error that ended the exchange (e.g. `received fatal alert:
    /// UnknownCA`), or `None` if etcd said nothing against us within [`PROBE_TIMEOUT`].
    pub async fn handshake_error(&self, endpoints: &[String]) -> Option<String> {
        use tokio::io::AsyncReadExt as _;
        for endpoint in endpoints {
            let address = endpoint
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let Ok(name) = ServerName::try_from(host.to_string()) else {
                continue;
            };
            let Ok(Ok(tcp)) =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address)).await
            else {
                continue;
            };
            let connector = tokio_rustls::TlsConnector::from(self.config.clone());
            let mut stream = match tokio::time::timeout(PROBE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return Some(err.to_string()),
                Err(_) => continue,
            };
            let mut byte = [0u8; 1];
            return match tokio::time::timeout(PROBE_TIMEOUT, stream.read(&mut byte)).await {
                Ok(Err(err)) => Some(err.to_string()),
                _ => None,
            };
        }
        None
    }
}

fn user(user: &EtcdUser) -> Result<(String, Password), ConfigError> {
    let bytes = read("ETCD_PASSWORD_FILE", &user.password_file)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid("ETCD_PASSWORD_FILE", &user.password_file, "must be UTF-8 text"))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(invalid(
            "ETCD_PASSWORD_FILE",
            &user.password_file,
            "must hold the password on its first line (it is empty)",
        ));
    }
    Ok((user.name.clone(), Password(password.to_string())))
}

fn invalid(var: &str, path: &Path, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(var, path.display().to_string(), reason)
}

fn read(var: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|err| invalid(var, path, format!("must be a readable file ({err})")))
}

/// Checks that `pem` holds at least one certificate, nothing unreadable, and that each is valid
/// now: an expired certificate is named here, where the TLS handshake would only report that
/// etcd closed the connection (TLS 1.3 checks the client's certificate after the handshake).
fn certificates(var: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let mut found = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|err| invalid(var, path, format!("must be PEM certificates: {err}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|err| invalid(var, path, format!("must be PEM X.509 certificates: {err}")))?;
        let validity = parsed.validity();
        let now = x509_parser::time::ASN1Time::now();
        if now > validity.not_after {
            let at = rfc3339(validity.not_after.timestamp());
            return Err(invalid(
                var,
                path,
                format!("must be valid now: it expired at {at}"),
            ));
        }
        if now < validity.not_before {
            let at = rfc3339(validity.not_before.timestamp());
            return Err(invalid(
                var,
                path,
                format!("must be valid now: it is valid from {at}"),
            ));
        }
        found.push(cert);
    }
    if found.is_empty() {
        return Err(invalid(
            var,
            path,
            "must hold a PEM certificate (-----BEGIN CERTIFICATE-----); it holds none",
        ));
    }
    Ok(found)
}

fn rfc3339(timestamp: i64) -> String {
    chrono::DateTime::from_timestamp(timestamp, 0).map_or_else(|| timestamp.to_string(), |t| t.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawCommonConfig, from_iter};

    fn config(pairs: &[(&str, String)]) -> CommonConfig {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.clone()));
        CommonConfig::try_from(from_iter::<RawCommonConfig, _>(vars).expect("raw")).expect("valid")
    }

    /// A self-signed certificate valid from `from` to `to` (years), and its key, as PEM.
    fn certificate(from: i32, to: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn each_file_problem_names_its_variable() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        let (ca_pem, key_pem) = certificate(2000, 4000);
        let ca = write("ca.pem", &ca_pem);
        let key = write("key.pem", &key_pem);
        let (old_pem, _) = certificate(2000, 2001);
        let expired = write("expired.pem", &old_pem);
        let not_pem = write("notes.txt", "hello\n");
        let empty = write("empty", "");
        let password = write("password", "s3cret\nignored\n");
        let message = |pairs: &[(&str, String)]| {
            Credentials::load(&config(pairs))
                .map(|c| format!("{c:?}"))
                .expect_err("invalid")
                .to_string()
        };
        let missing = dir.join("missing.pem").display().to_string();
        assert_eq!(
            message(&[("ETCD_CA_FILE", missing.clone())]),
            format!(
                "ETCD_CA_FILE={missing:?} is invalid: must be a readable file (No such file or directory (os error 2))"
            )
        );
        assert!(
            message(&[("ETCD_CA_FILE", not_pem.clone())]).starts_with(&format!(
                "ETCD_CA_FILE={not_pem:?} is invalid: must hold a PEM certificate"
            ))
        );
        let client = |cert: &str, key: &str| {
            vec![
                ("ETCD_CA_FILE", ca.clone()),
                ("ETCD_CERT_FILE", cert.to_string()),
                ("ETCD_KEY_FILE", key.to_string()),
            ]
        };
        let m = message(&client(&empty, &key));
        assert!(m.starts_with("ETCD_CERT_FILE="), "{m}");
        let m = message(&client(&ca, &ca));
        assert!(m.starts_with("ETCD_KEY_FILE="), "a certificate is no key: {m}");
        assert_eq!(
            message(&client(&expired, &key)),
            format!(
                "ETCD_CERT_FILE={expired:?} is invalid: must be valid now: it expired at 2001-01-01T00:00:00+00:00"
            )
        );
        assert!(message(&[("ETCD_CA_FILE", expired.clone())]).starts_with("ETCD_CA_FILE="));
        assert!(
            message(&[
                ("ETCD_USERNAME", "gateway".into()),
                ("ETCD_PASSWORD_FILE", empty.clone())
            ])
            .ends_with("must hold the password on its first line (it is empty)")
        );
        assert!(Credentials::load(&config(&client(&ca, &key))).is_ok());
        let loaded = Credentials::load(&config(&[
            ("ETCD_USERNAME", "gateway".into()),
            ("ETCD_PASSWORD_FILE", password),
        ]))
        .expect("loads");
        assert!(loaded.has_user());
        let shown = format!("{loaded:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
