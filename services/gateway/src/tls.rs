//! HTTPS: the gateway's certificate, renewed without a restart, and a listener that completes
//! TLS handshakes beside the accept loop (a slow or silent client cannot hold up the others).
//!
//! The certificate chain and key come from `GATEWAY_TLS_CERT_FILE` and `GATEWAY_TLS_KEY_FILE`
//! (PEM). The server's rustls configuration asks [`Certificate`] for the certified key at every
//! handshake, so replacing it (see [`crate::reload`]) takes effect for the next connection;
//! connections already open keep the certificate they were made with. A new pair that does not
//! parse, or whose key does not match the certificate, is refused and the old one stays.

use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use axum::serve::Listener;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::reload::{FileError, Source};

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the HTTP server to take them.
const ACCEPT_QUEUE: usize = 64;

/// The crypto the gateway uses (the same provider whatever else the process links).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate the gateway presents; replaced when the files change.
#[derive(Debug)]
pub(crate) struct Certificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Reads and checks the pair named by `cert` and `key`.
    pub(crate) fn load(cert: &Source, key: &Source) -> Result<Self, FileError> {
        let certified = parse(cert, &cert.read()?, key, &key.read()?)?;
        Ok(Certificate {
            current: RwLock::new(Arc::new(certified)),
        })
    }

    /// Presents `certified` from the next handshake on.
    pub(crate) fn replace(&self, certified: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
    }

    /// The rustls configuration of a server presenting this certificate (HTTP/1.1).
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A certificate chain and its private key from PEM, checked to belong together.
pub(crate) fn parse(
    cert: &Source,
    cert_pem: &[u8],
    key: &Source,
    key_pem: &[u8],
) -> Result<CertifiedKey, FileError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert.error(format!("is not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert.error("holds no PEM CERTIFICATE block"));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| key.error(format!("holds no usable PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        key.error(format!(
            "does not go with the certificate in {}: {e}",
            cert.path.display()
        ))
    })
}

/// Accepts TCP connections and completes their TLS handshakes on separate tasks; the HTTP
/// server takes the handshaken streams in the order they finish.
pub(crate) struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp` with `config` until `shutdown`.
    pub(crate) fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, incoming) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx, shutdown));
        Ok(TlsListener { incoming, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            accepted = tcp.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: wait rather than spin (as axum does).
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accept loop stopped (shutdown): no connection will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
