//! Certificates made at test time with `rcgen`: a CA, a server certificate for `127.0.0.1` and
//! `localhost`, client certificates (valid, long expired, or signed by a CA etcd does not
//! trust), and an unrelated CA (the "wrong CA" a client may be given). All are PEM files in a temporary directory that lives as long as
//! the [`TestPki`] (or any clone of it).
//!
//! ```
//! let pki = telemetry_harness::TestPki::new().expect("certificates");
//! let client = pki.client("telemetry").expect("a client certificate");
//! assert!(std::fs::read_to_string(client.cert).expect("PEM").starts_with("-----BEGIN CERTIFICATE-----"));
//! assert!(pki.ca_file().exists());
//! ```

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{HarnessError, io};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

/// A test CA and the certificates it issues; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct TestPki {
    inner: Arc<Inner>,
}

struct Inner {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir()).finish()
    }
}

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> HarnessError + '_ {
    move |err| HarnessError::Io {
        context: format!("generating {what}"),
        source: std::io::Error::other(err.to_string()),
    }
}

/// A self-signed CA named `name`.
fn new_ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, HarnessError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.remove(DnType::CommonName);
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(rcgen_error("a CA key"))?;
    CertifiedIssuer::self_signed(params, key).map_err(rcgen_error("a CA certificate"))
}

impl TestPki {
    /// A new CA in a new temporary directory (`ca.pem`).
    pub fn new() -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("telemetry-pki-")
            .tempdir()
            .map_err(io("creating a certificates dir"))?;
        let ca = new_ca("telemetry test CA")?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).map_err(io("writing ca.pem"))?;
        Ok(TestPki {
            inner: Arc::new(Inner { ca, ca_file, dir }),
        })
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The CA certificate (`ETCD_CA_FILE`, etcd's `--trusted-ca-file`).
    pub fn ca_file(&self) -> PathBuf {
        self.inner.ca_file.clone()
    }

    /// A certificate etcd can serve on `127.0.0.1` and `localhost` (`server.pem`).
    pub fn server(&self) -> Result<CertFiles, HarnessError> {
        self.issue("server", server_params()?)
    }

    /// A server certificate like [`TestPki::server`] that expired in 2001 (`expired-server.pem`).
    pub fn expired_server(&self) -> Result<CertFiles, HarnessError> {
        let mut params = server_params()?;
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue("expired-server", params)
    }

    /// A client certificate whose CN is `common_name` (with `--client-cert-auth`, etcd takes the
    /// CN as the user unless a password is sent), valid from 1975 to 4096.
    pub fn client(&self, common_name: &str) -> Result<CertFiles, HarnessError> {
        self.issue(&format!("client-{common_name}"), client_params(common_name))
    }

    /// A client certificate that expired in 2001.
    pub fn expired_client(&self, common_name: &str) -> Result<CertFiles, HarnessError> {
        let mut params = client_params(common_name);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue(&format!("expired-{common_name}"), params)
    }

    /// The certificate of another CA, which signed nothing etcd presents (`other-ca.pem`).
    pub fn other_ca_file(&self) -> Result<PathBuf, HarnessError> {
        let other = new_ca("another test CA")?;
        let path = self.dir().join("other-ca.pem");
        std::fs::write(&path, other.pem()).map_err(io("writing other-ca.pem"))?;
        Ok(path)
    }

    /// A client certificate whose CN is `common_name`, valid, but signed by another CA than
    /// the one etcd trusts (`--trusted-ca-file`).
    pub fn foreign_client(&self, common_name: &str) -> Result<CertFiles, HarnessError> {
        let other = new_ca("a CA etcd does not trust")?;
        self.issue_by(
            &other,
            &format!("foreign-{common_name}"),
            client_params(common_name),
        )
    }

    fn issue(&self, name: &str, params: CertificateParams) -> Result<CertFiles, HarnessError> {
        self.issue_by(&self.inner.ca, name, params)
    }

    fn issue_by(
        &self,
        ca: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
        params: CertificateParams,
    ) -> Result<CertFiles, HarnessError> {
        let key = KeyPair::generate().map_err(rcgen_error("a key"))?;
        let cert = params.signed_by(&key, ca).map_err(rcgen_error("a certificate"))?;
        let files = CertFiles {
            cert: self.dir().join(format!("{name}.pem")),
            key: self.dir().join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).map_err(io(format!("writing {name}.pem")))?;
        std::fs::write(&files.key, key.serialize_pem()).map_err(io(format!("writing {name}-key.pem")))?;
        Ok(files)
    }
}

fn server_params() -> Result<CertificateParams, HarnessError> {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .map_err(rcgen_error("server parameters"))?;
    params.distinguished_name.remove(DnType::CommonName);
    params.distinguished_name.push(DnType::CommonName, "etcd");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn client_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.remove(DnType::CommonName);
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}
