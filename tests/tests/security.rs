//! etcd over TLS with authentication on, as in production: certificates made at test time
//! (`TestPki`), etcd with `--client-cert-auth`, users and roles made by
//! `telemetry-admin auth setup --enable`, and every service binary as its own user.
//!
//! - the sample goes through streamer, collector, gateway and exporter (into Prometheus)
//!   exactly once while tokens expire (a quiet period longer than `--auth-token-ttl`) and while
//!   etcd restarts (which forgets every simple token);
//! - each role is refused what it must not do (the gateway writes nothing, the streamer cannot
//!   touch stored telemetry, the collector and the exporter cannot touch stream checkpoints,
//!   the exporter writes only its own keys), and the shared client renews an expired token
//!   where a plain one fails;
//! - a wrong CA, an expired client certificate, a client certificate of another CA, an expired
//!   etcd certificate and a wrong password each stop every binary at start with one line saying
//!   which.
//!
//! The service binaries are the ones the workspace build put next to this test's directory.

use std::{path::PathBuf, sync::Arc, time::Duration};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use telemetry_harness::{
    CertFiles, Env, EtcdOptions, EtcdServer, Finished, Probe, ProcessSpec, ServiceProcess, TestPki, Tsdb,
    TsdbKind, assert_rows_exactly_once, expected_samples, free_port, sample,
};
use telemetry_shared::{CommonConfig, Keyspace, config::RawCommonConfig};

const NS: &str = "/sec";
/// `EXPORTER_NAME` of the exporter.
const EXPORTER: &str = "e";

fn bin(name: &str) -> PathBuf {
    telemetry_harness::workspace_bin_dir().join(name)
}

/// A TLS etcd with authentication on and the pipeline's users, made by `auth setup`.
struct Secured {
    server: EtcdServer,
    pki: TestPki,
    passwords: tempfile::TempDir,
}

impl Secured {
    /// Starts etcd with `options`, TLS and `--client-cert-auth`, then runs
    /// `telemetry-admin auth setup --enable` (and again, as root, to see it change nothing).
    async fn start(options: EtcdOptions) -> Self {
        let pki = TestPki::new().expect("certificates");
        let server = EtcdServer::start_with(options.with_tls(&pki, true))
            .await
            .expect("etcd starts with TLS");
        let passwords = tempfile::tempdir().expect("password dir");
        let secured = Secured {
            server,
            pki,
            passwords,
        };
        let dir = secured.passwords.path().display().to_string();
        let first = secured
            .admin(
                secured.server.env(NS),
                &["--json", "auth", "setup", "--enable", "--password-dir", &dir],
            )
            .await;
        assert_eq!(first.status.code(), Some(0), "{first:?}");
        let report: serde_json::Value = serde_json::from_str(&first.stdout).expect("JSON report");
        assert_eq!(report["authentication"], "enabled now", "{report}");
        assert!(
            report["users"]
                .as_array()
                .expect("users")
                .iter()
                .all(|u| u["status"] == "created"),
            "{report}"
        );
        for user in ["root", "telemetry-sec-streamer", "telemetry-sec-gateway"] {
            let password =
                std::fs::read_to_string(secured.passwords.path().join(user)).expect("password file");
            assert!(!first.stdout.contains(password.trim()), "a password was printed");
        }
        // Again, now that authentication is on: as root, and nothing changes.
        let again = secured
            .admin(
                secured.env("root"),
                &["auth", "setup", "--enable", "--password-dir", &dir],
            )
            .await;
        assert_eq!(again.status.code(), Some(0), "{again:?}");
        assert!(
            again.stdout.contains("authentication: enabled\n"),
            "{}",
            again.stdout
        );
        for line in again.stdout.lines().filter(|l| l.starts_with("telemetry-sec-")) {
            assert!(
                line.contains(" exists "),
                "a second run changed something: {line}\n{}",
                again.stdout
            );
        }
        secured
    }

    /// The user name of `service` (`root` is root).
    fn user(service: &str) -> String {
        if service == "root" {
            "root".into()
        } else {
            format!("telemetry-sec-{service}")
        }
    }

    /// The environment of `service` as its own user: the TLS files and its password file.
    fn env(&self, service: &str) -> Env {
        let user = Self::user(service);
        let password = self.passwords.path().join(&user);
        self.server.env(NS).etcd_user(&user, &password)
    }

    /// Runs `telemetry-admin` with `args` to its end.
    async fn admin(&self, env: Env, args: &[&str]) -> Finished {
        let spec = ProcessSpec::new(bin("telemetry-admin"))
            .args(args.iter().copied())
            .env(env);
        tokio::task::spawn_blocking(move || spec.run_within(Duration::from_secs(30)))
            .await
            .expect("joins")
            .expect("telemetry-admin runs")
    }

    /// A client of the shared layer for `service`, as the binaries connect.
    async fn client(&self, service: &str) -> Client {
        let raw: RawCommonConfig = telemetry_shared::config::from_iter(self.env(service)).expect("raw");
        let config = CommonConfig::try_from(raw).expect("valid");
        telemetry_shared::etcd::connect(&config).await.expect("connects")
    }
}

fn start(binary: &str, env: Env) -> ServiceProcess {
    ProcessSpec::new(bin(binary)).env(env).start().expect("starts")
}

async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url).await.expect("the gateway answers");
    assert!(response.status().is_success(), "{response:?}");
    response.json().await.expect("JSON")
}

/// The sample through a streamer, a collector, a gateway and an exporter (into a real
/// Prometheus), each as its own user over TLS: midway the streamer is stopped for longer than
/// the token TTL (the streamer's token expires while it is paused, the gateway's and the
/// exporter's while they have nothing to do), and later etcd is killed and restarted (it
/// forgets every token). Every row is stored once and every sample lands in Prometheus once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_as_its_users_through_token_expiry_and_an_etcd_restart() {
    // Durable (fsync on): etcd is killed here. Tokens expire after 2 s unused.
    let options = EtcdOptions {
        extra_args: vec!["--max-txn-ops".into(), "128".into()],
        ..EtcdOptions::default()
    }
    .with_token_ttl(2);
    let mut secured = Secured::start(options).await;
    let root = secured
        .server
        .client()
        .await
        .expect("root client (certificate CN)");
    let probe = Probe::new(&root, NS);

    let collector = start("telemetry-collector", secured.env("collector").collector("c0"));
    let port = free_port().expect("port");
    let gateway = start("telemetry-gateway", secured.env("gateway").gateway(port));
    let tsdb = Tsdb::start(TsdbKind::prometheus())
        .await
        .expect("prometheus starts");
    let exporter = start(
        "telemetry-exporter",
        secured.env("exporter").exporter(&tsdb.write_url(), EXPORTER),
    );
    assert!(
        probe.all_partitions_owned(Duration::from_secs(30)).await,
        "the collector owns the partitions"
    );
    let mut streamer = start(
        "telemetry-streamer",
        secured
            .env("streamer")
            .streamer(sample::path(), sample::STREAM_ID)
            .set("RATE", 400),
    );

    // A quiet period longer than the TTL: every token expires.
    probe.wait_for_records(300, Duration::from_secs(30)).await;
    streamer.pause().expect("SIGSTOP");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let stats = get_json(&format!("http://127.0.0.1:{port}/api/v1/stats")).await;
    assert!(
        stats["total_records"].as_u64().is_some_and(|n| n >= 300),
        "{stats}"
    );
    streamer.resume().expect("SIGCONT");

    // etcd restarts: simple tokens live in its memory only.
    probe.wait_for_records(1200, Duration::from_secs(60)).await;
    secured.server.member().kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    secured.server.restart().await.expect("etcd restarts");

    let status = streamer.wait_timeout(Duration::from_secs(90)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the streamer finished: {status:?}\n{}",
        streamer.log()
    );
    let root = secured.server.client().await.expect("root client");
    let probe = Probe::new(&root, NS);
    probe
        .wait_drained(sample::ROWS as i64, Duration::from_secs(60))
        .await;
    let records = probe.records().await;
    assert_rows_exactly_once(
        records.values(),
        &format!("{}-w0", sample::STREAM_ID),
        0,
        sample::ROWS,
    );
    assert_eq!(records.len() as u64, sample::ROWS);
    let stats = get_json(&format!("http://127.0.0.1:{port}/api/v1/stats")).await;
    assert_eq!(stats["total_records"], sample::ROWS, "{stats}");
    // The gateway's etcd checks (a status request, its live feed) pass as its own user.
    let ready_url = format!("http://127.0.0.1:{port}/readyz");
    let ready = telemetry_harness::eventually(Duration::from_secs(30), || async {
        reqwest::get(ready_url.as_str())
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(
        ready,
        "the gateway is ready: {:?}",
        reqwest::get(ready_url.as_str()).await
    );
    let checkpoint = probe
        .wait_exported(EXPORTER, sample::ROWS, Duration::from_secs(60))
        .await;
    assert_eq!(
        (checkpoint.records, checkpoint.rejected, checkpoint.expired),
        (sample::ROWS, 0, 0),
        "{checkpoint:?}"
    );
    let time = chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + 60.0;
    let expected = expected_samples(records.values());
    let exported = tsdb.samples("DCGM_.+", "3h", time).await.expect("samples");
    assert_eq!(exported.len(), expected.len(), "samples in Prometheus");
    assert!(
        exported == expected,
        "Prometheus holds other samples than the stored records'"
    );

    // The admin user reads everything it audits.
    let expect = sample::ROWS.to_string();
    let audit = secured
        .admin(secured.env("admin"), &["audit", "--expect", &expect])
        .await;
    assert_eq!(audit.status.code(), Some(0), "{audit:?}");

    for service in [&collector, &gateway, &exporter] {
        let log = service.log();
        assert!(!log.contains("permission denied"), "{}: {log}", service.name());
    }
}

fn denied(result: Result<impl std::fmt::Debug, etcd_client::Error>) -> bool {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            status.code() == tonic::Code::PermissionDenied && status.message().contains("permission denied")
        }
        _ => false,
    }
}

/// What each role may not do is refused by etcd, and leases follow the keys attached to them.
/// A client that does not renew its token fails after the TTL; the shared client renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_refuse_what_each_service_must_not_do_and_tokens_are_renewed() {
    let secured = Secured::start(EtcdOptions::strict().with_token_ttl(2)).await;
    let keys = Keyspace::new(NS);
    let record = keys.data_record("h", "0", "2026-01-01T00:00:00.000000Z", "01J");

    let mut gateway = secured.client("gateway").await;
    assert!(
        gateway.get(keys.data_prefix(), None).await.is_ok(),
        "the gateway reads data"
    );
    assert!(
        denied(gateway.put(record.as_str(), "x", None).await),
        "gateway put"
    );
    assert!(
        denied(gateway.delete(record.as_str(), None).await),
        "gateway delete"
    );
    let txn = Txn::new()
        .when([Compare::create_revision(record.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(record.as_str(), "x", None)]);
    assert!(denied(gateway.txn(txn).await), "gateway txn");
    assert!(
        denied(gateway.put(keys.stream_checkpoint("s"), "x", None).await),
        "gateway checkpoint"
    );

    let mut streamer = secured.client("streamer").await;
    assert!(
        denied(streamer.put(record.as_str(), "x", None).await),
        "streamer writes data"
    );
    assert!(
        denied(streamer.get(record.as_str(), None).await),
        "streamer reads data"
    );
    assert!(
        streamer
            .put(keys.stream_checkpoint("s"), "{}", None)
            .await
            .is_ok(),
        "streamer checkpoint"
    );

    let mut collector = secured.client("collector").await;
    assert!(
        denied(collector.put(keys.stream_checkpoint("s"), "x", None).await),
        "collector checkpoint"
    );
    assert!(
        denied(collector.get(keys.stream_checkpoint("s"), None).await),
        "collector reads checkpoints"
    );
    assert!(
        collector.put(record.as_str(), "x", None).await.is_ok(),
        "collector stores"
    );

    let mut exporter = secured.client("exporter").await;
    assert!(
        exporter.get(record.as_str(), None).await.is_ok(),
        "the exporter reads data"
    );
    assert!(
        denied(exporter.put(record.as_str(), "x", None).await),
        "exporter writes data"
    );
    assert!(
        denied(exporter.delete(record.as_str(), None).await),
        "exporter deletes data"
    );
    assert!(
        denied(exporter.get(keys.stream_checkpoint("s"), None).await),
        "exporter reads checkpoints"
    );
    assert!(
        denied(exporter.put(keys.queue_entry(0, "01J"), "x", None).await),
        "exporter enqueues"
    );
    let export_checkpoint = keys.exporter_checkpoint(EXPORTER);
    assert!(
        exporter.put(export_checkpoint.as_str(), "{}", None).await.is_ok(),
        "its own checkpoint"
    );
    assert!(
        denied(streamer.delete(export_checkpoint.as_str(), None).await),
        "streamer deletes it"
    );
    assert!(
        denied(collector.put(export_checkpoint.as_str(), "x", None).await),
        "collector writes it"
    );

    // Leases: granting needs no permission; revoking needs write on every attached key, and so
    // does attaching a key to a lease that holds keys the user cannot write.
    let lease = collector.lease_grant(30, None).await.expect("grant").id();
    let member = keys.member("c0");
    collector
        .put(member.as_str(), "{}", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("collector registers");
    assert!(
        gateway.lease_grant(30, None).await.is_ok(),
        "any user may grant a lease"
    );
    assert!(
        denied(gateway.lease_revoke(lease).await),
        "the gateway cannot revoke it"
    );
    let marker = keys.dedup_marker(&"00".repeat(32));
    assert!(
        denied(
            streamer
                .put(marker.as_str(), "", Some(PutOptions::new().with_lease(lease)))
                .await
        ),
        "the streamer cannot attach its marker to the collector's lease"
    );
    assert!(
        collector.lease_revoke(lease).await.is_ok(),
        "the collector revokes its own"
    );

    // Token expiry: 2 s unused. A client without renewal fails; the shared one renews.
    let password =
        std::fs::read_to_string(secured.passwords.path().join("telemetry-sec-gateway")).expect("password");
    let ca = std::fs::read(secured.pki.ca_file()).expect("CA");
    let client_cert = secured.pki.client("plain").expect("client certificate");
    let identity = etcd_client::Identity::from_pem(
        std::fs::read(&client_cert.cert).expect("cert"),
        std::fs::read(&client_cert.key).expect("key"),
    );
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(ca))
        .identity(identity);
    let options = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_user("telemetry-sec-gateway", password.trim());
    let mut plain = Client::connect([secured.server.endpoint()], Some(options))
        .await
        .expect("connects");
    assert!(plain.get(keys.data_prefix(), None).await.is_ok());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let expired = plain.get(keys.data_prefix(), None).await;
    assert!(
        matches!(&expired, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Unauthenticated),
        "a token unused for longer than the TTL is refused: {expired:?}"
    );
    assert!(
        gateway.get(keys.data_prefix(), None).await.is_ok(),
        "the shared client renews its token"
    );
    assert!(
        denied(gateway.put(record.as_str(), "x", None).await),
        "and is still the gateway"
    );

    // A permission granted by hand is revoked by the next `auth setup`, which says so.
    let mut root = secured.server.client().await.expect("root client");
    let streams = keys.streams_prefix();
    let extra = etcd_client::Permission::read_write(streams.as_str())
        .with_range_end(telemetry_shared::keys::prefix_end(&streams));
    root.role_grant_permission("telemetry-sec-gateway", extra)
        .await
        .expect("grant by hand");
    let checkpoint = keys.stream_checkpoint("s");
    assert!(
        gateway.put(checkpoint.as_str(), "x", None).await.is_ok(),
        "granted by hand"
    );
    let setup = secured
        .admin(secured.env("root"), &["--json", "auth", "setup"])
        .await;
    assert_eq!(setup.status.code(), Some(0), "{setup:?}");
    let report: serde_json::Value = serde_json::from_str(&setup.stdout).expect("JSON report");
    let revoked: Vec<&serde_json::Value> = report["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .filter(|g| g["status"] == "revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "{report}");
    assert_eq!(revoked[0]["role"], "telemetry-sec-gateway");
    assert_eq!(revoked[0]["prefix"], streams.as_str());
    assert!(
        denied(gateway.put(checkpoint.as_str(), "x", None).await),
        "revoked"
    );
}

/// A TLS server on a free loopback port that presents `files` and does nothing else: enough
/// for a client to judge its certificate (an etcd whose certificate expired, without an etcd
/// that would have to start with it). It runs as long as the test's runtime.
async fn tls_only_server(files: &CertFiles) -> u16 {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("certificate file")
        .collect::<Result<_, _>>()
        .expect("PEM certificates");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("PEM key");
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move { acceptor.accept(tcp).await.map(drop) });
        }
    });
    port
}

/// A binary under test: its file name, its service (user), its arguments and the variables it
/// needs besides etcd's.
type Binary<'a> = (&'a str, &'a str, Vec<&'a str>, Vec<(&'a str, String)>);

/// One binary's start with `env` and what it printed.
async fn run(binary: &str, args: &[&str], env: Env) -> Finished {
    let spec = ProcessSpec::new(bin(binary)).args(args.iter().copied()).env(env);
    tokio::task::spawn_blocking(move || spec.run_within(Duration::from_secs(20)))
        .await
        .expect("joins")
        .expect("ends in time")
}

/// A wrong CA, an expired client certificate, a client certificate etcd does not trust, an
/// expired etcd certificate and a wrong password stop every binary at start with one line
/// naming the cause: refusals by etcd or of etcd (the CA, the foreign certificate, etcd's
/// expired one, the password) with status 1, a certificate file that cannot be used (expired,
/// not PEM) with status 2 like any invalid variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_every_binary_at_start_with_the_cause() {
    let secured = Secured::start(EtcdOptions::strict()).await;
    let wrong_ca = secured.pki.other_ca_file().expect("another CA");
    let expired = secured
        .pki
        .expired_client("telemetry-service")
        .expect("expired certificate");
    let foreign = secured
        .pki
        .foreign_client("telemetry-service")
        .expect("foreign certificate");
    let expired_etcd = format!(
        "https://127.0.0.1:{}",
        tls_only_server(&secured.pki.expired_server().expect("expired server certificate")).await
    );
    let foreign_says = format!(
        "etcd refused the client certificate in ETCD_CERT_FILE={:?}: it is not signed by a CA \
         etcd trusts",
        foreign.cert.display().to_string()
    );
    let wrong_password = secured.passwords.path().join("wrong");
    std::fs::write(&wrong_password, "not-the-password\n").expect("write");
    let not_pem = secured.passwords.path().join("not-pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let port = free_port().expect("port").to_string();
    let write_url = format!("http://127.0.0.1:{}/api/v1/write", free_port().expect("port"));
    let binaries: [Binary<'_>; 5] = [
        (
            "telemetry-streamer",
            "streamer",
            vec![],
            vec![("CSV_PATH", sample::path().display().to_string())],
        ),
        ("telemetry-collector", "collector", vec![], vec![]),
        (
            "telemetry-gateway",
            "gateway",
            vec![],
            vec![("GATEWAY_PORT", port.clone())],
        ),
        (
            "telemetry-exporter",
            "exporter",
            vec![],
            vec![("REMOTE_WRITE_URL", write_url.clone())],
        ),
        ("telemetry-admin", "admin", vec!["queue"], vec![]),
    ];
    for (binary, service, args, extra) in &binaries {
        let base = extra
            .iter()
            .fold(secured.env(service), |env, (k, v)| env.set(k, v));
        let cases: [(&str, Env, i32, &str); 6] = [
            (
                "a wrong CA",
                base.clone().set("ETCD_CA_FILE", wrong_ca.display()),
                1,
                "etcd's TLS certificate is not trusted: it is not signed by the CA in ETCD_CA_FILE=",
            ),
            (
                "an expired client certificate",
                base.clone()
                    .set("ETCD_CERT_FILE", expired.cert.display())
                    .set("ETCD_KEY_FILE", expired.key.display()),
                2,
                "is invalid: must be valid now: it expired at 2001-01-01T00:00:00+00:00",
            ),
            (
                "a client certificate of a CA etcd does not trust",
                base.clone()
                    .set("ETCD_CERT_FILE", foreign.cert.display())
                    .set("ETCD_KEY_FILE", foreign.key.display()),
                1,
                &foreign_says,
            ),
            (
                "an etcd whose certificate expired",
                base.clone().set("ETCD_ENDPOINTS", &expired_etcd),
                1,
                "etcd's TLS certificate is not trusted: it is outside its validity period",
            ),
            (
                "a wrong password",
                base.clone().set("ETCD_PASSWORD_FILE", wrong_password.display()),
                1,
                "etcd refused the password of user \"telemetry-sec-",
            ),
            (
                "a CA file that is not PEM",
                base.clone().set("ETCD_CA_FILE", not_pem.display()),
                2,
                "ETCD_CA_FILE=",
            ),
        ];
        for (what, env, code, says) in cases {
            let out = run(binary, args, env).await;
            let stderr = out.stderr.trim_end();
            assert_eq!(out.status.code(), Some(code), "{binary} with {what}: {stderr}");
            let last = stderr.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("error: ") && last.contains(says),
                "{binary} with {what} says {says:?}: {stderr}"
            );
            println!("{binary} with {what}: {last}");
        }
    }
    // And with what `auth setup` made, each binary connects (the admin lists the queue).
    let out = run("telemetry-admin", &["queue"], secured.env("admin")).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // The handshake connect falls back on when gRPC saw only a closed connection hears etcd's
    // alert every time, and nothing against an accepted certificate.
    let probe_of = |env: Env| {
        let raw: RawCommonConfig = telemetry_shared::config::from_iter(env).expect("raw");
        let config = CommonConfig::try_from(raw).expect("valid");
        let credentials = telemetry_shared::credentials::Credentials::load(&config).expect("files");
        (
            credentials.client_tls_probe().expect("a client certificate"),
            config.etcd_endpoints,
        )
    };
    let (probe, endpoints) = probe_of(
        secured
            .env("admin")
            .set("ETCD_CERT_FILE", foreign.cert.display())
            .set("ETCD_KEY_FILE", foreign.key.display()),
    );
    let heard = probe.handshake_error(&endpoints).await;
    assert!(
        heard
            .as_deref()
            .is_some_and(|h| h.contains("received fatal alert: UnknownCA")),
        "{heard:?}"
    );
    let (probe, endpoints) = probe_of(secured.env("admin"));
    assert_eq!(probe.handshake_error(&endpoints).await, None);
}
