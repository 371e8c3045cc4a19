//! The scrape source against real exposition servers: the DCGM sample served as dcgm-exporter
//! text, Prometheus' own `/metrics` and `/federate`, Debian's node exporter, and targets that
//! stall or serve garbage. Exactly once per scrape through SIGKILLs between and during scrapes,
//! and with two streamers on one target list.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use telemetry_harness::{
    Behaviour, Env, ExpositionServer, NodeExporter, PrometheusOptions, PrometheusServer, ServiceProcess,
    eventually, eventually_every,
};
use telemetry_shared::{Checkpoint, Message};
use telemetry_streamer::{Flags, StreamerConfig, target_stream_id};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(90);

/// A scrape-only streamer's environment: `targets` every `interval`, no queue limit.
fn scrape_env(server: &telemetry_harness::EtcdServer, targets: &[String], interval: &str) -> Env {
    server
        .env(NS)
        .scraper(targets, interval)
        .set("MAX_QUEUE_DEPTH", "0")
}

fn spawn_scraper(
    server: &telemetry_harness::EtcdServer,
    targets: &[String],
    extra: &[(&str, &str)],
) -> ServiceProcess {
    binary()
        .rust_log("info")
        .env(scrape_env(server, targets, "1s").with(extra))
        .start()
        .expect("binary starts")
}

/// The checkpoint of `url`'s stream.
async fn checkpoint(probe: &Probe, url: &str) -> Option<Checkpoint> {
    probe.checkpoint(&target_stream_id(url)).await
}

/// Waits until `url` has `scrapes` complete scrapes (its checkpoint is complete at pass
/// `scrapes - 1` or beyond).
async fn wait_scrapes(probe: &Probe, url: &str, scrapes: u64) {
    let done = eventually(WAIT, || async {
        checkpoint(probe, url)
            .await
            .is_some_and(|cp| cp.pass + 1 > scrapes || (cp.pass + 1 == scrapes && cp.pass_complete))
    })
    .await;
    assert!(
        done,
        "{url}: {scrapes} scrapes not done: {:?}",
        checkpoint(probe, url).await
    );
}

/// Runs a streamer in this process on the one target `url` until it has `scrapes` complete
/// scrapes, then stops it (it must stop cleanly).
async fn scrape_in_process(
    server: &telemetry_harness::EtcdServer,
    client: &etcd_client::Client,
    probe: &Probe,
    url: &str,
    scrapes: u64,
) {
    let targets = [url.to_string()];
    let cfg = StreamerConfig::from_vars(scrape_env(server, &targets, "1s"), &Flags::default())
        .expect("valid config");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(telemetry_streamer::run(cfg, client.clone(), shutdown.clone()));
    wait_scrapes(probe, url, scrapes).await;
    shutdown.cancel();
    run.await.expect("joins").expect("stops cleanly");
}

/// The queued messages of `url`, by scrape time.
fn by_scrape(queue: &BTreeMap<String, Message>, url: &str) -> BTreeMap<String, Vec<Message>> {
    let mut out: BTreeMap<String, Vec<Message>> = BTreeMap::new();
    for m in queue.values().filter(|m| m.fields["target"] == url) {
        let time = m.fields["scrape_time"].as_str().expect("scrape_time").to_string();
        out.entry(time).or_default().push(m.clone());
    }
    out
}

/// Every scrape of `url` in the queue holds each series once and no key twice; every scrape
/// but an unfinished last one holds `series` series; the scrapes are those the checkpoint
/// counts. Returns the number of complete scrapes.
async fn assert_each_scrape_once(probe: &Probe, url: &str, series: usize) -> usize {
    let queue = probe.queue().await;
    let scrapes = by_scrape(&queue, url);
    let cp = checkpoint(probe, url).await.expect("a checkpoint");
    let mut keys = BTreeSet::new();
    for (time, messages) in &scrapes {
        let mut seen = BTreeSet::new();
        for m in messages {
            assert!(
                keys.insert(m.idempotency_key.clone()),
                "{url} {time}: a key twice"
            );
            let identity = (
                m.fields["metric_name"].clone().to_string(),
                m.fields["labels_raw"].to_string(),
            );
            assert!(seen.insert(identity), "{url} {time}: a series twice");
            assert_eq!(m.timestamp.to_string(), *time, "stamped with the scrape time");
        }
        let last = Some(time.as_str()) == cp.scrape_time.as_deref();
        if !last || cp.pass_complete {
            assert_eq!(messages.len(), series, "{url} {time}: a complete scrape");
        }
    }
    assert_eq!(scrapes.len() as u64, cp.pass + 1, "{url}: one group per scrape");
    scrapes.len() - usize::from(!cp.pass_complete)
}

#[tokio::test]
async fn the_dcgm_sample_scraped_becomes_messages_named_like_csv_rows() {
    let (server, client, probe) = etcd().await;
    let target = ExpositionServer::start().await.expect("exposition server");
    let url = target.url();
    scrape_in_process(&server, &client, &probe, &url, 2).await;

    let complete = assert_each_scrape_once(&probe, &url, sample::ROWS as usize).await;
    assert!(complete >= 2);
    let queue = probe.queue().await;
    let first = by_scrape(&queue, &url).into_values().next().expect("a scrape");
    let gpus: BTreeSet<(String, String)> = first
        .iter()
        .map(|m| (m.fields["Hostname"].to_string(), m.fields["gpu_id"].to_string()))
        .collect();
    assert_eq!(gpus.len(), sample::GPUS, "gpu_id is per host");
    let m = first
        .iter()
        .find(|m| m.fields["metric_name"] == "DCGM_FI_DEV_GPU_UTIL")
        .expect("a GPU_UTIL sample");
    for field in [
        "timestamp",
        "metric_name",
        "gpu_id",
        "device",
        "modelName",
        "Hostname",
        "uuid",
        "DCGM_FI_DRIVER_VERSION",
        "value",
        "labels_raw",
        "target",
        "scrape_time",
    ] {
        assert!(m.fields.contains_key(field), "{field} missing: {:?}", m.fields);
    }
    assert!(m.fields["value"].is_number());
    assert!(m.fields["uuid"].as_str().expect("text").starts_with("GPU-"));
    assert_eq!(m.fields["modelName"], sample::MODEL);
}

#[tokio::test]
async fn sigkill_during_and_between_scrapes_enqueues_each_scrape_once() {
    let (server, _client, probe) = etcd().await;
    let target = ExpositionServer::start().await.expect("exposition server");
    let url = target.url();
    let targets = [url.clone()];
    // The sample is 2,470 series: about 40 transactions per scrape, so a kill can land inside.
    let mut child = spawn_scraper(&server, &targets, &[]);
    let mid_scrape = eventually_every(Duration::from_millis(2), WAIT, || async {
        checkpoint(&probe, &url)
            .await
            .is_some_and(|cp| !cp.pass_complete && cp.row > 0)
    })
    .await;
    child.kill();
    assert!(mid_scrape, "never saw a scrape in progress: {}", child.log());
    let cut = checkpoint(&probe, &url).await.expect("checkpoint");

    // Restarted: it waits for the dead owner's lease, then finishes the cut scrape first.
    let mut child = spawn_scraper(&server, &targets, &[]);
    wait_scrapes(&probe, &url, cut.pass + 2).await;
    assert!(
        child.log().contains("resuming an unfinished scrape"),
        "{}",
        child.log()
    );
    // Killed between scrapes (the checkpoint complete), restarted again.
    let between = eventually_every(Duration::from_millis(2), WAIT, || async {
        checkpoint(&probe, &url).await.is_some_and(|cp| cp.pass_complete)
    })
    .await;
    child.kill();
    assert!(between);
    let before = checkpoint(&probe, &url).await.expect("checkpoint");
    let mut child = spawn_scraper(&server, &targets, &[]);
    wait_scrapes(&probe, &url, before.pass + 2).await;
    child.terminate().expect("SIGTERM");
    assert!(child.wait().await.success(), "{}", child.log());

    let complete = assert_each_scrape_once(&probe, &url, sample::ROWS as usize).await;
    assert!(complete as u64 > cut.pass + 1);
    let queue = probe.queue().await;
    let resumed = &by_scrape(&queue, &url)[cut.scrape_time.as_deref().expect("time")];
    assert_eq!(
        resumed.len() as u64,
        sample::ROWS,
        "the cut scrape is whole, once"
    );
}

#[tokio::test]
async fn two_streamers_share_a_target_list_without_doubling() {
    let (server, _client, probe) = etcd().await;
    let target = ExpositionServer::start().await.expect("exposition server");
    let urls: Vec<String> = (0..6).map(|i| target.target_url(i)).collect();
    let mut a = spawn_scraper(&server, &urls, &[]);
    let mut b = spawn_scraper(&server, &urls, &[]);
    for url in &urls {
        wait_scrapes(&probe, url, 3).await;
    }
    // Each target has one owner: kill a streamer and the other takes its targets over.
    a.kill();
    let progress: Vec<u64> = futures_pass(&probe, &urls).await;
    for (url, pass) in urls.iter().zip(&progress) {
        wait_scrapes(&probe, url, pass + 3).await;
    }
    b.terminate().expect("SIGTERM");
    assert!(b.wait().await.success(), "{}", b.log());
    for url in &urls {
        assert_each_scrape_once(&probe, url, telemetry_harness::exposition::SIM_SERIES).await;
    }
    assert_eq!(
        probe.count(&probe.keys().scrapes_prefix()).await,
        0,
        "owners released"
    );
}

async fn futures_pass(probe: &Probe, urls: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for url in urls {
        out.push(checkpoint(probe, url).await.map_or(0, |cp| cp.pass));
    }
    out
}

#[tokio::test]
async fn targets_that_stall_fail_or_serve_garbage_are_counted_and_stall_nothing() {
    let (server, _client, probe) = etcd().await;
    let good = ExpositionServer::start().await.expect("server");
    let stalled = ExpositionServer::start().await.expect("server");
    stalled.set(Behaviour::Stall);
    let garbage = ExpositionServer::start().await.expect("server");
    garbage.set(Behaviour::Garbage);
    let broken = ExpositionServer::start().await.expect("server");
    broken.set(Behaviour::Status(500));
    let down = format!(
        "http://127.0.0.1:{}/metrics",
        telemetry_harness::free_port().expect("port")
    );
    let urls = vec![
        good.target_url(0),
        stalled.target_url(0),
        garbage.target_url(0),
        broken.target_url(0),
        down.clone(),
    ];
    let port = telemetry_harness::free_port().expect("port").to_string();
    let mut child = spawn_scraper(
        &server,
        &urls,
        &[("METRICS_PORT", port.as_str()), ("SCRAPE_TIMEOUT", "300ms")],
    );
    wait_scrapes(&probe, &urls[0], 4).await;
    let metrics_port: u16 = port.parse().expect("port");
    let failed = |text: &str, url: &str, reason: &str| {
        text.lines().any(|l| {
            l.starts_with("streamer_scrape_failures_total")
                && l.contains(&format!("target=\"{url}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
    };
    let counted = eventually(WAIT, || async {
        let text = telemetry_harness::scrape_metrics(metrics_port)
            .await
            .unwrap_or_default();
        failed(&text, &urls[1], "timeout")
            && failed(&text, &urls[2], "malformed")
            && failed(&text, &urls[3], "http")
            && failed(&text, &down, "down")
    })
    .await;
    let text = telemetry_harness::scrape_metrics(metrics_port)
        .await
        .unwrap_or_default();
    assert!(counted, "{text}");
    if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
        panic!("promtool check metrics:\n{complaints}\n{text}");
    }
    assert!(
        text.contains(&format!("streamer_scrape_up{{target=\"{}\"}} 1", urls[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("streamer_scrape_up{{target=\"{}\"}} 0", urls[2])),
        "{text}"
    );
    // The garbage target recovers; the good one went on all along.
    let before = checkpoint(&probe, &urls[0]).await.expect("cp").pass;
    garbage.set(Behaviour::Serve);
    wait_scrapes(&probe, &urls[2], 1).await;
    wait_scrapes(&probe, &urls[0], before + 2).await;
    child.terminate().expect("SIGTERM");
    assert!(child.wait().await.success(), "{}", child.log());
    let log = child.log();
    let failing = |url: &str| {
        log.lines()
            .filter(|l| l.contains("scrape target failing") && l.contains(url))
            .count()
    };
    assert_eq!(failing(&urls[2]), 1, "logged once per state change:\n{log}");
    assert!(log.contains("scrape target is up again"), "{log}");
    for url in [&urls[1], &urls[3], &down] {
        assert_eq!(failing(url), 1, "{url}:\n{log}");
        assert_eq!(checkpoint(&probe, url).await, None, "nothing enqueued for {url}");
    }
    assert_each_scrape_once(&probe, &urls[0], telemetry_harness::exposition::SIM_SERIES).await;
}

#[tokio::test]
async fn prometheus_metrics_federate_and_the_node_exporter_are_scraped() {
    let (server, client, probe) = etcd().await;
    let node = NodeExporter::start()
        .await
        .expect("prometheus-node-exporter starts");
    let node_target = node
        .url()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let prometheus = PrometheusServer::start(PrometheusOptions {
        scrape: vec![("node".into(), vec![node_target], "/metrics".into())],
        ..PrometheusOptions::default()
    })
    .await
    .expect("prometheus starts");
    let urls = vec![
        format!("{}/metrics", prometheus.url()),
        format!("{}/federate?match[]=%7Bjob%3D%22node%22%7D", prometheus.url()),
        node.url(),
    ];
    let cfg =
        StreamerConfig::from_vars(scrape_env(&server, &urls, "1s"), &Flags::default()).expect("valid config");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(telemetry_streamer::run(cfg, client.clone(), shutdown.clone()));
    // Federation answers nothing until Prometheus has scraped the node exporter once.
    for url in &urls {
        let scraped = eventually(WAIT, || async {
            checkpoint(&probe, url)
                .await
                .is_some_and(|cp| cp.pass_complete && cp.row > 100)
        })
        .await;
        assert!(scraped, "{url}: {:?}", checkpoint(&probe, url).await);
    }
    shutdown.cancel();
    run.await.expect("joins").expect("stops cleanly");
    let queue = probe.queue().await;
    for url in &urls {
        let scrapes = by_scrape(&queue, url);
        let samples: usize = scrapes.values().map(Vec::len).sum();
        assert!(samples > 100, "{url}: {samples}");
        for messages in scrapes.values() {
            let series: BTreeSet<String> = messages
                .iter()
                .map(|m| format!("{}{}", m.fields["metric_name"], m.fields["labels_raw"]))
                .collect();
            assert_eq!(
                series.len(),
                messages.len(),
                "{url}: a series twice in one scrape"
            );
        }
    }
    let has = |url: &str, metric: &str| {
        queue
            .values()
            .any(|m| m.fields["target"] == url && m.fields["metric_name"] == metric)
    };
    assert!(has(&urls[0], "prometheus_build_info"));
    assert!(
        has(&urls[0], "prometheus_http_request_duration_seconds_bucket"),
        "histograms flatten"
    );
    assert!(has(&urls[2], "node_cpu_seconds_total"));
    // Federated samples carry Prometheus' own timestamps, kept as the timestamp field.
    let federated = queue
        .values()
        .find(|m| m.fields["target"] == urls[1].as_str())
        .expect("a federated sample");
    assert!(
        !federated.fields.contains_key("label_job"),
        "job is not one of ours"
    );
    assert_eq!(federated.fields["job"], "node");
    assert_ne!(federated.fields["timestamp"], federated.fields["scrape_time"]);
}

#[tokio::test]
async fn a_target_file_is_re_read_when_it_changes_and_must_exist_at_start() {
    let (server, client, probe) = etcd().await;
    let target = ExpositionServer::start().await.expect("exposition server");
    let (first, second) = (target.target_url(0), target.target_url(1));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("targets");
    let env = |path: &std::path::Path| scrape_env(&server, &[], "1s").set("SCRAPE_TARGETS", path.display());

    let missing =
        StreamerConfig::from_vars(env(&dir.path().join("nope")), &Flags::default()).expect("valid config");
    let err = telemetry_streamer::run(missing, client.clone(), CancellationToken::new())
        .await
        .expect_err("a missing target file");
    assert!(err.to_string().contains("SCRAPE_TARGETS"), "{err}");

    std::fs::write(&file, format!("# dcgm-exporters\n{first}\n")).expect("write");
    let cfg = StreamerConfig::from_vars(env(&file), &Flags::default()).expect("valid config");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(telemetry_streamer::run(cfg, client.clone(), shutdown.clone()));
    wait_scrapes(&probe, &first, 2).await;
    std::fs::write(&file, format!("{second}\n")).expect("rewrite");
    wait_scrapes(&probe, &second, 1).await;
    // The first target stopped: its owner key is released and it scrapes no more.
    let owner = probe.keys().scrape_owner(&target_stream_id(&first));
    let released = eventually(WAIT, || async { probe.count(&owner).await == 0 }).await;
    assert!(released, "the removed target's owner key stays");
    let stopped_at = checkpoint(&probe, &first).await.expect("cp").pass;
    let now = checkpoint(&probe, &second).await.expect("cp").pass;
    wait_scrapes(&probe, &second, now + 3).await;
    assert_eq!(checkpoint(&probe, &first).await.expect("cp").pass, stopped_at);
    shutdown.cancel();
    run.await.expect("joins").expect("stops cleanly");
    assert_each_scrape_once(&probe, &first, telemetry_harness::exposition::SIM_SERIES).await;
    assert_each_scrape_once(&probe, &second, telemetry_harness::exposition::SIM_SERIES).await;
}

#[tokio::test]
async fn a_target_answering_openmetrics_is_read_as_openmetrics() {
    let (server, client, probe) = etcd().await;
    let target = ExpositionServer::start().await.expect("exposition server");
    target.set(Behaviour::OpenMetrics);
    let url = target.target_url(7);
    scrape_in_process(&server, &client, &probe, &url, 2).await;
    assert!(target.requests() >= 2);
    assert_each_scrape_once(&probe, &url, telemetry_harness::exposition::SIM_SERIES).await;
    let queue = probe.queue().await;
    let m = queue
        .values()
        .find(|m| m.fields["target"] == url.as_str())
        .expect("a sample");
    assert_eq!(m.fields["Hostname"], "sim-0007");
}
