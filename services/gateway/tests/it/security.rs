//! The gateway's security, with real TLS clients: HTTPS with reqwest and a `wss://` subscriber
//! (tokio-tungstenite over tokio-rustls), both trusting a CA made for the test (rcgen); a
//! certificate renewed on disk is served from the next connection on, without a restart, and a
//! broken renewal keeps the previous one. Tokens: 401 without or with a wrong token, answered
//! before any etcd work (a gateway whose etcd is down still says 401, not 503); changes to the
//! tokens file apply without a restart; 429 with `Retry-After` past a token's request rate and
//! its WebSocket subscriptions. The probes stay open, and `/readyz` follows etcd.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SerialNumber};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName},
    },
};
use tokio_tungstenite::{
    WebSocketStream, client_async,
    tungstenite::{self, Message, client::IntoClientRequest as _, http::HeaderValue},
};

use crate::helpers::*;

const TOKEN: &str = "tok-4f2b8c1d9e7a6b5c3d2e1f0a";
const OTHER: &str = "tok-0a1b2c3d4e5f60718293a4b5";

/// A certificate authority made for one test, and the files the gateway reads.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway test CA");
        let key = KeyPair::generate().expect("CA key");
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).expect("CA"),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A certificate for 127.0.0.1 with `serial` and a fresh key: (certificate, key) in PEM.
    fn pair(&self, serial: u64) -> (String, String) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params.serial_number = Some(SerialNumber::from(serial));
        params.distinguished_name.push(DnType::CommonName, "gateway");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &*self.ca).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a pair and replaces the files, each by a rename (as a renewal tool does).
    fn issue(&self, serial: u64) {
        let (cert, key) = self.pair(serial);
        self.replace("tls.key", &key);
        self.replace("tls.crt", &cert);
    }

    fn replace(&self, name: &str, content: &str) {
        let staged = self.path(&format!(".{name}.new"));
        std::fs::write(&staged, content).expect("write");
        std::fs::rename(&staged, self.path(name)).expect("rename");
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// An HTTPS client trusting only this CA, opening a new connection per request.
    fn https(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_der(self.ca_der().as_ref()).expect("CA");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .pool_max_idle_per_host(0)
            .tls_info(true)
            .build()
            .expect("client")
    }

    fn rustls_client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).expect("CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn tokens_file(dir: &Path, tokens: &[&str]) -> PathBuf {
    let path = dir.join("tokens");
    let text = format!("# API tokens of the test\n\n{}\n", tokens.join("\n"));
    std::fs::write(&path, text).expect("write tokens");
    path
}

/// A gateway over HTTPS with tokens, and where to reach it.
struct Secure {
    gw: Gateway,
    https: String,
    addr: SocketAddr,
}

async fn spawn_secure(
    server: &telemetry_harness::EtcdServer,
    client: &etcd_client::Client,
    pki: &Pki,
    extra: &[(&str, &str)],
) -> Secure {
    pki.issue(1);
    let tokens = tokens_file(pki.dir.path(), &[TOKEN, OTHER]);
    let (cert, key) = (pki.path("tls.crt"), pki.path("tls.key"));
    let (cert, key, tokens) = (
        cert.display().to_string(),
        key.display().to_string(),
        tokens.display().to_string(),
    );
    let mut vars = vec![
        ("GATEWAY_TLS_CERT_FILE", cert.as_str()),
        ("GATEWAY_TLS_KEY_FILE", key.as_str()),
        ("GATEWAY_API_TOKENS_FILE", tokens.as_str()),
        ("GATEWAY_RELOAD_INTERVAL", "100ms"),
    ];
    vars.extend_from_slice(extra);
    let gw = spawn_gateway(server, client, &vars).await;
    let port: u16 = gw
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    Secure {
        https: format!("https://127.0.0.1:{port}"),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        gw,
    }
}

/// GET with an optional bearer token → (status, headers, JSON body, serial of the server's
/// certificate).
async fn fetch(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value, Vec<u8>) {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let serial = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(serial_of)
        .unwrap_or_default();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body, serial)
}

/// The serial number of a DER certificate: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE
/// { [0] version, serialNumber INTEGER, … } … }.
fn serial_of(der: &[u8]) -> Vec<u8> {
    fn header(der: &[u8]) -> (u8, usize, usize) {
        let tag = der[0];
        let (len, size) = match der[1] {
            n if n < 0x80 => (n as usize, 2),
            n => {
                let bytes = (n & 0x7f) as usize;
                let len = der[2..2 + bytes]
                    .iter()
                    .fold(0usize, |acc, b| acc << 8 | *b as usize);
                (len, 2 + bytes)
            }
        };
        (tag, size, len)
    }
    let (_, outer, _) = header(der);
    let tbs = &der[outer..];
    let (_, inner, _) = header(tbs);
    let mut rest = &tbs[inner..];
    let (tag, size, len) = header(rest);
    if tag == 0xa0 {
        rest = &rest[size + len..];
    }
    let (tag, size, len) = header(rest);
    assert_eq!(tag, 0x02, "serialNumber is an INTEGER");
    let serial = &rest[size..size + len];
    // DER adds a leading zero to keep a positive number positive.
    serial.strip_prefix(&[0]).unwrap_or(serial).to_vec()
}

type TlsSocket = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A `wss://` handshake trusting the test CA, with the given extra header.
async fn wss(
    pki: &Pki,
    addr: SocketAddr,
    path: &str,
    header: Option<(&'static str, String)>,
) -> Result<(TlsSocket, tungstenite::handshake::client::Response), tungstenite::Error> {
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = TlsConnector::from(pki.rustls_client())
        .connect(name, tcp)
        .await
        .expect("TLS handshake trusting the test CA");
    let mut request = format!("wss://127.0.0.1:{}{path}", addr.port())
        .into_client_request()
        .expect("request");
    if let Some((name, value)) = header {
        request
            .headers_mut()
            .insert(name, HeaderValue::from_str(&value).expect("header"));
    }
    client_async(request, tls).await
}

async fn next_json(socket: &mut TlsSocket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON frame");
        }
    }
}

/// The status and JSON body of a refused WebSocket handshake.
fn refused(
    result: Result<(TlsSocket, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> (u16, Option<String>, Value) {
    match result {
        Err(tungstenite::Error::Http(response)) => {
            let retry = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (response.status().as_u16(), retry, body)
        }
        Err(other) => panic!("refused otherwise: {other}"),
        Ok(_) => panic!("the handshake was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_a_certificate_renewed_without_restart() {
    let (server, client) = etcd().await;
    let pki = Pki::new();
    let gw = spawn_secure(&server, &client, &pki, &[]).await;
    let http = pki.https();

    // HTTPS, with the token: the first certificate.
    let (status, _, body, serial) = fetch(&http, &format!("{}/api/v1/gpus", gw.https), Some(TOKEN)).await;
    assert_eq!((status, serial.as_slice()), (200, &[1u8][..]), "{body}");
    // Plain HTTP to the HTTPS port gets nothing.
    assert!(reqwest::get(format!("{}/health", gw.gw.base)).await.is_err());

    // wss:// with the token in Authorization, and as a browser sends it: subprotocols.
    let (mut socket, _) = wss(
        &pki,
        gw.addr,
        "/api/v1/ws/telemetry",
        Some(("authorization", format!("Bearer {TOKEN}"))),
    )
    .await
    .expect("wss with Authorization");
    assert_eq!(next_json(&mut socket).await["type"], "hello");
    let (mut browser, response) = wss(
        &pki,
        gw.addr,
        "/api/v1/ws/telemetry",
        Some(("sec-websocket-protocol", format!("telemetry, bearer.{OTHER}"))),
    )
    .await
    .expect("wss with the token as a subprotocol");
    assert_eq!(response.headers()["sec-websocket-protocol"], "telemetry");
    assert_eq!(next_json(&mut browser).await["type"], "hello");
    // Without a token, the handshake is refused with the JSON 401.
    let (status, _, body) = refused(wss(&pki, gw.addr, "/api/v1/ws/telemetry", None).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );

    // Telemetry written now reaches the wss subscriber.
    let csv = csv_file(&[("DCGM_FI_DEV_GPU_UTIL", "0", "GPU-tls-0", "host-tls", "")]);
    load_csv(&server, &client, csv.path(), 1).await;
    let frame = next_json(&mut socket).await;
    assert_eq!(frame["type"], "telemetry", "{frame}");

    // Renewal: a new certificate (and key) on disk is served from the next connection on.
    pki.issue(2);
    // (A fresh client each time: one that resumes its TLS session sees the old certificate.)
    let renewed = telemetry_harness::eventually(Duration::from_secs(10), || async {
        fetch(&pki.https(), &format!("{}/health", gw.https), None).await.3 == [2u8]
    })
    .await;
    assert!(renewed, "the renewed certificate was not picked up");
    drop(socket);

    // A broken renewal (a certificate whose key does not match) keeps the last good pair.
    let rejections = || async {
        let (_, _, metrics, _) = fetch(&http, &format!("{}/metrics", gw.https), None).await;
        metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("gateway_file_reloads_total{file=\"tls\",outcome=\"rejected\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = rejections().await;
    let (mismatched, _) = pki.pair(3);
    pki.replace("tls.crt", &mismatched);
    let rejected =
        telemetry_harness::eventually(Duration::from_secs(10), || async { rejections().await > before })
            .await;
    assert!(rejected, "the mismatched pair was not reported");
    let (status, _, _, serial) = fetch(&pki.https(), &format!("{}/livez", gw.https), None).await;
    assert_eq!(
        (status, serial.as_slice()),
        (200, &[2u8][..]),
        "still the last good certificate"
    );
    gw.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_etcd_and_reloaded_without_restart() {
    let (mut server, client) = etcd().await;
    let pki = Pki::new();
    let gw = spawn_secure(&server, &client, &pki, &[("GATEWAY_TOKEN_RATE", "0")]).await;
    let http = pki.https();
    let gpus = format!("{}/api/v1/gpus", gw.https);

    let (status, headers, body, _) = fetch(&http, &gpus, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"telemetry\"");
    let (status, headers, body, _) = fetch(&http, &gpus, Some("tok-not-a-token-of-ours-at-all")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token")),
        "{body}"
    );
    assert!(
        headers["www-authenticate"]
            .to_str()
            .expect("ascii")
            .contains("invalid_token")
    );
    assert_eq!(fetch(&http, &gpus, Some(TOKEN)).await.0, 200);
    // Open whatever the tokens: probes, docs, the dashboard, metrics (the default choice).
    for open in [
        "/health",
        "/livez",
        "/readyz",
        "/openapi.json",
        "/docs/",
        "/",
        "/metrics",
        "/metrics/gpus",
    ] {
        let (status, _, body, _) = fetch(&http, &format!("{}{open}", gw.https), None).await;
        assert_eq!(status, 200, "{open}: {body}");
    }
    let (_, _, doc, _) = fetch(&http, &format!("{}/openapi.json", gw.https), None).await;
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    // etcd down: a refused token is still a 401 at once (no etcd request), a good one waits
    // for etcd and gets the 503; liveness holds, readiness says why not.
    server.member().kill();
    let started = std::time::Instant::now();
    assert_eq!(fetch(&http, &gpus, None).await.0, 401);
    assert_eq!(
        fetch(&http, &gpus, Some("tok-not-a-token-of-ours-at-all"))
            .await
            .0,
        401
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (status, _, body, _) = fetch(&http, &format!("{}/api/v1/stats", gw.https), Some(TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    let (status, _, body, _) = fetch(&http, &format!("{}/readyz", gw.https), None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("failing")),
        "{body}"
    );
    assert_eq!(body["checks"]["etcd"]["ok"], false, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.starts_with("etcd: ")),
        "{body}"
    );
    assert_eq!(fetch(&http, &format!("{}/livez", gw.https), None).await.0, 200);
    server.restart().await.expect("etcd restarts");
    let ready = telemetry_harness::eventually(Duration::from_secs(30), || async {
        fetch(&http, &format!("{}/readyz", gw.https), None).await.0 == 200
    })
    .await;
    assert!(ready, "/readyz did not recover with etcd");

    // The tokens file changes: the removed token is refused, the new one accepted.
    let fresh = "tok-fresh-0123456789abcdef";
    tokens_file(pki.dir.path(), &[OTHER, fresh]);
    let reloaded = telemetry_harness::eventually(Duration::from_secs(10), || async {
        fetch(&http, &gpus, Some(fresh)).await.0 == 200
    })
    .await;
    assert!(reloaded, "the new token was not accepted");
    assert_eq!(fetch(&http, &gpus, Some(TOKEN)).await.0, 401);
    // A malformed file is rejected as a whole: the tokens in use stay.
    std::fs::write(pki.path("tokens"), "short\n").expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(fetch(&http, &gpus, Some(fresh)).await.0, 200);
    gw.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_429_with_retry_after() {
    let (server, client) = etcd().await;
    let pki = Pki::new();
    let gw = spawn_secure(
        &server,
        &client,
        &pki,
        &[
            ("GATEWAY_TOKEN_RATE", "1"),
            ("GATEWAY_TOKEN_BURST", "3"),
            ("GATEWAY_TOKEN_MAX_SUBSCRIPTIONS", "1"),
            ("GATEWAY_METRICS_REQUIRE_TOKEN", "true"),
        ],
    )
    .await;
    let http = pki.https();
    let stats = format!("{}/api/v1/stats", gw.https);

    // The burst, then 429 with a JSON body and Retry-After.
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..6 {
        let (status, headers, body, _) = fetch(&http, &stats, Some(TOKEN)).await;
        statuses.push(status);
        if status == 429 {
            limited = Some((headers, body));
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    let (headers, body) = limited.expect("a 429 past the burst");
    assert_eq!(body["error"], "rate_limited", "{body}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    // Another token has its own budget; metrics need a token with this configuration.
    assert_eq!(fetch(&http, &stats, Some(OTHER)).await.0, 200);
    assert_eq!(fetch(&http, &format!("{}/metrics", gw.https), None).await.0, 401);
    assert_eq!(
        fetch(&http, &format!("{}/metrics", gw.https), Some(OTHER))
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(fetch(&http, &stats, Some(TOKEN)).await.0, 200, "the rate refills");

    // One subscription per token: the second gets 429 until the first closes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let auth = || Some(("authorization", format!("Bearer {TOKEN}")));
    let (mut first, _) = wss(&pki, gw.addr, "/api/v1/ws/telemetry", auth())
        .await
        .expect("first");
    assert_eq!(next_json(&mut first).await["type"], "hello");
    let (status, retry, body) = refused(wss(&pki, gw.addr, "/api/v1/ws/telemetry", auth()).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_subscriptions")),
        "{body}"
    );
    assert_eq!(retry.as_deref(), Some("5"));
    first.close(None).await.expect("close");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = telemetry_harness::eventually(Duration::from_secs(10), || async {
        wss(&pki, gw.addr, "/api/v1/ws/telemetry", auth()).await.is_ok()
    })
    .await;
    assert!(again, "the slot was not freed when the socket closed");
    gw.gw.shutdown().await;
}

/// Without tokens nothing changes: no 401, no 429, and the document declares neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_stays_open() {
    let (server, client) = etcd().await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let (status, _) = get(&http, &format!("{}/api/v1/stats", gw.base)).await;
        assert_eq!(status, 200);
    }
    let (_, doc) = get(&http, &format!("{}/openapi.json", gw.base)).await;
    assert!(
        doc["components"]["securitySchemes"].is_null(),
        "{}",
        doc["components"]
    );
    let (status, live) = get(&http, &format!("{}/livez", gw.base)).await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["checks"]["live_feed"]["ok"], true, "{live}");
    assert_eq!(live["checks"]["window"]["ok"], true, "{live}");
    let ready = telemetry_harness::eventually(Duration::from_secs(10), || async {
        get(&http, &format!("{}/readyz", gw.base)).await.0 == 200
    })
    .await;
    let (_, body) = get(&http, &format!("{}/readyz", gw.base)).await;
    assert!(ready, "{body}");
    assert_eq!(body["service"], "gateway");
    for check in ["etcd", "live_feed", "window"] {
        assert_eq!(body["checks"][check]["ok"], true, "{check}: {body}");
    }
    gw.shutdown().await;
}
