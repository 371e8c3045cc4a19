//! The Prometheus and Grafana deploy files (`deploy/prometheus/`, `deploy/grafana/`) against real
//! processes.
//!
//! - promtool checks both scrape configurations and the alert rules, and runs the rules' unit
//!   tests (`alerts_test.yml`, which makes every alert fire).
//! - The scrape targets are the services of `deploy/compose.yaml` and the headless Services and
//!   named ports of `deploy/k8s/`; the dashboard's data source, variables and layout fit its
//!   provisioning files and the compose mounts.
//! - A real Prometheus, configured from `deploy/prometheus/prometheus.yml` with only its targets
//!   and intervals rewritten to this machine and `alerts.yml` as its rule file, scrapes a
//!   running pipeline: a real etcd, the real streamer and collector binaries (each serving its
//!   own `/metrics` on a free `METRICS_PORT`) and an in-process gateway. PromQL must find the
//!   sample's 247 GPUs with the sample's values and labels; every alert rule must evaluate with
//!   health `ok`, a queue entry the test plants must make `TelemetryDeadLetters` active and the
//!   sample's nearly full GPUs `GpuFramebufferNearlyFull`; and every panel query of the Grafana
//!   dashboard, with its template variables substituted by real values (and by "All"), must
//!   return data. No panel needs `or vector(0)`: the collector registers its unlabelled
//!   counters (dead letters, fence refusals) at zero when it starts, so their series exist.
//!
//! The service binaries come from the same `cargo nextest run --workspace` (or
//! `cargo build --bins`), like the chaos test's.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde::Deserialize as _;
use serde_json::Value as Json;
use serde_norway::Value;
use telemetry_harness::{
    eventually, free_port,
    prometheus::{PrometheusOptions, PrometheusServer},
};
use telemetry_shared::{Keyspace, keys::partition_of};
use tokio_util::sync::CancellationToken;

const NS: &str = "/prom";
const GPUS: usize = 247;
const METRICS: usize = 10;
/// The fleet's series (the job also has Prometheus' own `up` and `scrape_*` series).
const FLEET: &str = "{job=\"gpu-telemetry\", __name__=~\"DCGM_FI_.+\"}";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    let mut doc: Value =
        serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    doc.apply_merge().expect("merge keys resolve");
    doc
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Runs promtool (`PROMTOOL_BIN` overrides) and returns its output; panics with it on failure.
fn promtool(args: &[&str]) -> String {
    let bin = std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into());
    let out = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} (install Debian's prometheus package): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every alerting rule of `alerts.yml`.
fn alert_rules() -> Vec<Value> {
    let doc = yaml(&deploy("prometheus/alerts.yml"));
    doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .filter(|r| !r["alert"].is_null())
        .collect()
}

#[test]
fn promtool_accepts_the_scrape_configurations_and_the_alert_rules() {
    for config in ["prometheus.yml", "prometheus-k8s.yml"] {
        let path = deploy(&format!("prometheus/{config}"));
        let out = promtool(&["check", "config", &path.display().to_string()]);
        assert!(
            out.contains("1 rule files found"),
            "{config} loads alerts.yml:\n{out}"
        );
    }
    let alerts = deploy("prometheus/alerts.yml").display().to_string();
    promtool(&["check", "rules", &alerts]);
    let tests = deploy("prometheus/alerts_test.yml").display().to_string();
    promtool(&["test", "rules", &tests]);

    let rules = alert_rules();
    let names: BTreeSet<String> = rules.iter().map(|r| text(&r["alert"])).collect();
    assert_eq!(names.len(), rules.len(), "alert names are unique");
    for rule in &rules {
        let name = text(&rule["alert"]);
        assert!(!text(&rule["for"]).is_empty(), "{name}: no `for`");
        let severity = text(&rule["labels"]["severity"]);
        assert!(
            ["warning", "critical"].contains(&severity.as_str()),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            assert!(
                !text(&rule["annotations"][annotation]).trim().is_empty(),
                "{name}: no {annotation}"
            );
        }
    }
    // Every alert fires in the unit tests, on series shaped like the real ones.
    let unit = yaml(&deploy("prometheus/alerts_test.yml"));
    let fired: BTreeSet<String> = unit["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().cloned().unwrap_or_default())
        .filter(|c| c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()))
        .map(|c| text(&c["alertname"]))
        .collect();
    let untested: Vec<&String> = names.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "alerts never fired by alerts_test.yml: {untested:?}"
    );
    for wanted in [
        "TelemetryTargetDown",
        "TelemetryQueueGrowing",
        "TelemetryCollectorLagHigh",
        "TelemetryDeadLetters",
        "TelemetryFenceRefusals",
        "EtcdBackendNearQuota",
        "GpuTemperatureHigh",
    ] {
        assert!(names.contains(wanted), "{wanted} missing from alerts.yml");
    }
}

/// Job name → (metrics path, honor_labels, static targets) of a scrape configuration.
fn static_jobs(config: &Value) -> BTreeMap<String, (String, bool, BTreeSet<String>)> {
    config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            let targets = job["static_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|s| s["targets"].as_sequence().cloned().unwrap_or_default())
                .map(|t| text(&t))
                .collect();
            let path = text(&job["metrics_path"]);
            let honor = job["honor_labels"].as_bool().unwrap_or(false);
            (text(&job["job_name"]), (path, honor, targets))
        })
        .collect()
}

#[test]
fn the_compose_scrape_targets_are_the_compose_services() {
    let config = yaml(&deploy("prometheus/prometheus.yml"));
    let jobs = static_jobs(&config);
    let compose = yaml(&deploy("compose.yaml"));
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (name, service) in compose["services"].as_mapping().expect("services") {
        let name = text(name);
        let mut env = service["environment"].clone();
        env.apply_merge().expect("merge keys resolve");
        let var = |k: &str| text(&env[k]);
        let jobs_of: &[&str] = match service["command"][0].as_str() {
            Some("telemetry-streamer") => &["telemetry-streamer"],
            Some("telemetry-collector") => &["telemetry-collector"],
            Some("telemetry-exporter") => &["telemetry-exporter"],
            Some("telemetry-gateway") => &["gpu-telemetry", "telemetry-gateway"],
            _ if name.starts_with("etcd-") => &["etcd"],
            _ => &[],
        };
        let port = match jobs_of.first() {
            None => continue,
            Some(&"etcd") => var("ETCD_LISTEN_CLIENT_URLS")
                .rsplit(':')
                .next()
                .expect("a port")
                .to_string(),
            Some(&"gpu-telemetry") => var("GATEWAY_PORT"),
            Some(_) => var("METRICS_PORT"),
        };
        assert!(
            port.parse::<u16>().is_ok_and(|p| p != 0),
            "compose service {name} serves no metrics port ({port:?})"
        );
        for job in jobs_of {
            expected.entry(job).or_default().insert(format!("{name}:{port}"));
        }
    }
    assert_eq!(
        jobs.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected.keys().copied().collect::<BTreeSet<_>>(),
        "scrape jobs"
    );
    for (job, targets) in &expected {
        assert_eq!(&jobs[*job].2, targets, "targets of job {job}");
    }
    assert_eq!(jobs["gpu-telemetry"].0, "/metrics/gpus");
    assert!(
        jobs["gpu-telemetry"].1,
        "gpu-telemetry keeps dcgm-exporter's labels (honor_labels)"
    );
    for job in [
        "telemetry-gateway",
        "telemetry-streamer",
        "telemetry-collector",
        "telemetry-exporter",
        "etcd",
    ] {
        assert_eq!(jobs[job].0, "/metrics", "{job}");
        assert!(!jobs[job].1, "{job}: the services' own labels are not honoured");
    }

    // Prometheus and Grafana run from the deploy files, mounted read-only.
    let services = &compose["services"];
    let mounts = |service: &str| -> Vec<String> {
        services[service]["volumes"]
            .as_sequence()
            .unwrap_or_else(|| panic!("compose service {service} has volumes"))
            .iter()
            .map(text)
            .filter(|m| m.starts_with("./"))
            .collect()
    };
    for (service, wanted) in [
        (
            "prometheus",
            vec![
                "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro",
            ],
        ),
        (
            "grafana",
            vec![
                "./grafana/provisioning:/etc/grafana/provisioning:ro",
                "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
            ],
        ),
    ] {
        let got = mounts(service);
        assert_eq!(got, wanted, "compose service {service}");
        for mount in got {
            let source = mount.split(':').next().expect("source");
            assert!(deploy(source).exists(), "{mount}: {source} missing");
        }
    }
}

/// Every document of every `deploy/k8s/*.yaml`.
fn k8s_docs() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        for doc in serde_norway::Deserializer::from_str(&read(&file)) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

#[test]
fn the_kubernetes_scrape_targets_are_services_and_named_ports_of_the_manifests() {
    let docs = k8s_docs();
    let of_kind = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
    };
    let workload_of = |app: &str| {
        docs.iter()
            .find(|d| {
                ["Deployment", "StatefulSet"].contains(&text(&d["kind"]).as_str())
                    && d["spec"]["template"]["metadata"]["labels"]["app"] == app
            })
            .unwrap_or_else(|| panic!("no workload with pods labelled app={app}"))
    };
    let container_ports = |workload: &Value| -> BTreeMap<String, u64> {
        workload["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()
            .expect("container ports")
            .iter()
            .map(|p| (text(&p["name"]), p["containerPort"].as_u64().expect("port")))
            .collect()
    };
    let config = yaml(&deploy("prometheus/prometheus-k8s.yml"));
    let mut jobs = BTreeSet::new();
    for job in config["scrape_configs"].as_sequence().expect("scrape_configs") {
        let name = text(&job["job_name"]);
        jobs.insert(name.clone());
        if name == "gpu-telemetry" {
            // Once, through the gateway's Service.
            let targets = static_jobs(&config)["gpu-telemetry"].2.clone();
            assert_eq!(
                targets,
                BTreeSet::from(["gateway.gpu-telemetry.svc:80".to_string()])
            );
            let service = of_kind("Service", "gateway");
            let port = &service["spec"]["ports"][0];
            assert_eq!(port["port"].as_u64(), Some(80));
            let target = port["targetPort"].as_u64().expect("targetPort");
            let pods = container_ports(workload_of(&text(&service["spec"]["selector"]["app"])));
            assert!(
                pods.values().any(|p| *p == target),
                "gateway pods listen on {target}"
            );
            continue;
        }
        let sd = &job["dns_sd_configs"][0];
        assert_eq!(text(&sd["type"]), "SRV", "{name}");
        let srv = text(&sd["names"][0]);
        // _<port name>._tcp.<service>.gpu-telemetry.svc
        let parts: Vec<&str> = srv.split('.').collect();
        assert_eq!(parts.len(), 5, "{name}: {srv}");
        assert_eq!(
            (parts[1], parts[3], parts[4]),
            ("_tcp", "gpu-telemetry", "svc"),
            "{srv}"
        );
        let (port_name, service_name) = (parts[0].trim_start_matches('_'), parts[2]);
        let service = of_kind("Service", service_name);
        assert_eq!(
            text(&service["spec"]["clusterIP"]),
            "None",
            "{service_name} is headless"
        );
        let port = service["spec"]["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == port_name)
            .unwrap_or_else(|| panic!("Service {service_name} has no port named {port_name}"));
        let number = port["port"].as_u64().expect("port");
        let app = text(&service["spec"]["selector"]["app"]);
        let workload = workload_of(&app);
        assert_eq!(
            container_ports(workload).get(port_name),
            Some(&number),
            "{service_name}: pods labelled app={app} have container port {port_name}={number}"
        );
        let binary = text(&workload["spec"]["template"]["spec"]["containers"][0]["command"][0]);
        let expected_job = match binary.as_str() {
            "telemetry-streamer" | "telemetry-collector" | "telemetry-exporter" | "telemetry-gateway" => {
                binary.clone()
            }
            _ => app.clone(),
        };
        assert_eq!(name, expected_job, "{srv} scrapes {binary}");
        if matches!(
            binary.as_str(),
            "telemetry-streamer" | "telemetry-collector" | "telemetry-exporter"
        ) {
            // METRICS_PORT, from the ConfigMaps the container reads.
            let port_set = workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]
                .as_sequence()
                .expect("envFrom")
                .iter()
                .map(|s| of_kind("ConfigMap", &text(&s["configMapRef"]["name"])))
                .find_map(|m| m["data"]["METRICS_PORT"].as_str().map(str::to_string));
            assert_eq!(port_set, Some(number.to_string()), "{binary}'s METRICS_PORT");
        }
    }
    let compose_jobs: BTreeSet<String> = static_jobs(&yaml(&deploy("prometheus/prometheus.yml")))
        .into_keys()
        .collect();
    assert_eq!(jobs, compose_jobs, "the same jobs in compose and Kubernetes");
}

fn dashboard() -> Json {
    serde_json::from_str(&read(&deploy("grafana/dashboards/gpu-telemetry.json"))).expect("dashboard JSON")
}

/// Every panel that is not a row.
fn panels(dashboard: &Json) -> Vec<&Json> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
        .filter(|p| p["type"] != "row")
        .collect()
}

/// The values of the dashboard's `job` (source) variable, a custom one.
fn source_options(dashboard: &Json) -> Vec<String> {
    let var = &dashboard["templating"]["list"][1];
    assert_eq!(
        (&var["name"], &var["type"]),
        (&Json::from("job"), &Json::from("custom"))
    );
    let options: Vec<String> = var["options"]
        .as_array()
        .expect("options")
        .iter()
        .map(|o| o["value"].as_str().expect("value").to_string())
        .collect();
    let query: Vec<String> = var["query"]
        .as_str()
        .expect("query")
        .split(',')
        .map(|o| o.trim().to_string())
        .collect();
    assert_eq!(options, query, "the options are the query's");
    options
}

/// A query variable's query (`label_values(selector, label)`).
fn variable_query(variable: &Json) -> String {
    variable["query"]["query"]
        .as_str()
        .or_else(|| variable["query"].as_str())
        .expect("variable query")
        .to_string()
}

#[test]
fn the_dashboard_and_its_provisioning_fit_together() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().expect("schemaVersion") >= 38,
        "Grafana 10 or later"
    );
    assert_eq!(dash["uid"], "gpu-telemetry");
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let names: Vec<&str> = vars.iter().map(|v| v["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["datasource", "job", "Hostname", "gpu"]);
    assert_eq!(
        (vars[0]["type"].as_str(), vars[0]["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    // One source of the fleet's series at a time: a Prometheus that scrapes the gateway and
    // receives the exporters' remote write holds each series twice (job="gpu-telemetry", and
    // without a job label).
    assert_eq!(source_options(&dash), ["gpu-telemetry", "^$"]);
    assert_eq!(
        vars[1]["current"]["value"], "gpu-telemetry",
        "the scraped fleet by default"
    );
    assert_eq!(
        (&vars[1]["multi"], &vars[1]["includeAll"]),
        (&Json::Bool(false), &Json::Bool(false)),
        "both sources at once would count every GPU twice"
    );
    assert_eq!(
        variable_query(&vars[2]),
        "label_values(DCGM_FI_DEV_GPU_UTIL{job=~\"$job\"}, Hostname)"
    );
    assert_eq!(
        variable_query(&vars[3]),
        "label_values(DCGM_FI_DEV_GPU_UTIL{job=~\"$job\", Hostname=~\"$Hostname\"}, gpu)"
    );
    let on_variable = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().expect("title"))
        .collect();
    assert_eq!(rows, ["Fleet", "Pipeline health"]);
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{title}: duplicate id"
        );
        let g = &panel["gridPos"];
        let [x, y, w, h] =
            ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}")));
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
    }
    for panel in panels(&dash) {
        let title = panel["title"].as_str().expect("title");
        assert_eq!(panel["datasource"], on_variable, "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"], on_variable, "{title}");
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "{title}");
            // Every selector of a fleet series names its source.
            for (at, _) in expr.match_indices("DCGM_FI_") {
                let selector = &expr[at..];
                let name_end = selector
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(selector.len());
                assert!(
                    selector[name_end..].starts_with("{job=~\"$job\""),
                    "{title}: {expr} selects no source"
                );
            }
        }
    }

    // The provisioned data source is compose's Prometheus, and the dashboards' path is where
    // compose mounts them.
    let source = yaml(&deploy("grafana/provisioning/datasources/prometheus.yml"));
    let source = &source["datasources"][0];
    assert_eq!(text(&source["type"]), "prometheus");
    assert_eq!(text(&source["url"]), "http://prometheus:9090");
    let compose = yaml(&deploy("compose.yaml"));
    assert!(
        compose["services"]["prometheus"]["ports"]
            .as_sequence()
            .is_some_and(|p| p.iter().any(|p| text(p).ends_with(":9090"))),
        "compose's prometheus listens on 9090"
    );
    let provider = yaml(&deploy("grafana/provisioning/dashboards/gpu-telemetry.yml"));
    assert_eq!(
        text(&provider["providers"][0]["options"]["path"]),
        "/var/lib/grafana/dashboards"
    );
}

/// A service binary run as a real process, killed when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(bin_dir: &Path, binary: &str, env: &[(&str, String)], logs: &Path) -> Process {
        let path = bin_dir.join(binary);
        assert!(
            path.exists(),
            "{} is missing: build the services first (cargo build --bins, or run the whole \
             workspace with cargo nextest run --workspace)",
            path.display()
        );
        let log = logs.join(format!("{binary}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Prometheus HTTP API.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Json {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let body: Json = resp.json().await.expect("Prometheus answers JSON");
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<Json> {
        let data = self.get("/api/v1/query", &[("query", promql)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of an instant query, if it has exactly one series.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        match self.query(promql).await.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
            _ => None,
        }
    }

    /// `label_values(selector, label)`, as Grafana evaluates it.
    async fn label_values(&self, query: &str) -> Vec<String> {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("not a label_values query: {query}"));
        let (selector, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
        let data = self
            .get(
                &format!("/api/v1/label/{}/values", label.trim()),
                &[("match[]", selector.trim())],
            )
            .await;
        let mut values: Vec<String> = data
            .as_array()
            .expect("label values")
            .iter()
            .map(|v| v.as_str().expect("string").to_string())
            .collect();
        values.sort_by_key(|v| (v.parse::<u64>().unwrap_or(u64::MAX), v.clone()));
        values
    }
}

/// A series of the fleet: (metric, Hostname, gpu).
type SeriesKey = (String, String, String);

/// A sample row's value and its GPU's identity.
struct Row {
    value: f64,
    uuid: String,
    device: String,
    model: String,
}

/// The sample, newest value per GPU and metric (each GPU has one row per metric).
fn sample() -> BTreeMap<SeriesKey, Row> {
    let mut reader = csv::Reader::from_path(root().join("data/dcgm_sample.csv")).expect("sample");
    let headers = reader.headers().expect("header").clone();
    let col = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let (metric, gpu, device, uuid, model, host, value) = (
        col("metric_name"),
        col("gpu_id"),
        col("device"),
        col("uuid"),
        col("modelName"),
        col("Hostname"),
        col("value"),
    );
    let mut out = BTreeMap::new();
    for row in reader.records() {
        let row = row.expect("row");
        out.insert(
            (
                row[metric].to_string(),
                row[host].to_string(),
                row[gpu].to_string(),
            ),
            Row {
                value: row[value].parse().expect("numeric value"),
                uuid: row[uuid].to_string(),
                device: row[device].to_string(),
                model: row[model].to_string(),
            },
        );
    }
    out
}

/// `deploy/prometheus/prometheus.yml` with every job's targets replaced by `targets[job]`, the
/// intervals at 1 s and the rule file's absolute path; nothing else changed.
fn local_config(targets: &BTreeMap<&str, String>) -> String {
    let mut config = yaml(&deploy("prometheus/prometheus.yml"));
    config["global"]["scrape_interval"] = Value::from("1s");
    config["global"]["evaluation_interval"] = Value::from("1s");
    let rules = deploy("prometheus/alerts.yml")
        .canonicalize()
        .expect("alerts.yml");
    config["rule_files"] = Value::Sequence(vec![Value::from(rules.display().to_string())]);
    for job in config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs")
    {
        let name = text(&job["job_name"]);
        let target = targets
            .get(name.as_str())
            .unwrap_or_else(|| panic!("the test does not know job {name}: give it a target"));
        let mut static_config = serde_norway::Mapping::new();
        static_config.insert(
            "targets".into(),
            Value::Sequence(vec![Value::from(target.clone())]),
        );
        job["static_configs"] = Value::Sequence(vec![Value::Mapping(static_config)]);
    }
    serde_norway::to_string(&config).expect("YAML")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_fleet_and_every_rule_and_panel_query_works() {
    let started = std::time::Instant::now();
    let logs = tempfile::tempdir().expect("log dir");
    let (etcd, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
    let common = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("ETCD_ENDPOINTS", etcd.endpoint()),
            ("ETCD_NAMESPACE", NS.to_string()),
        ];
        env.extend(extra.iter().cloned());
        env
    };

    // The collector and the streamer as real processes, each with its own /metrics.
    let bins = telemetry_harness::workspace_bin_dir();
    let collector_port = free_port().expect("port");
    let collector = Process::start(
        &bins,
        "telemetry-collector",
        &common(&[
            ("COLLECTOR_ID", "collector-1".into()),
            ("LEASE_TTL", "5s".into()),
            ("METRICS_PORT", collector_port.to_string()),
        ]),
        logs.path(),
    );
    let streamer_port = free_port().expect("port");
    let streamer = Process::start(
        &bins,
        "telemetry-streamer",
        &common(&[
            (
                "CSV_PATH",
                root().join("data/dcgm_sample.csv").display().to_string(),
            ),
            ("STREAM_ID", "dcgm".into()),
            // Looping like the deployed streamers, fast enough that the first pass over the
            // sample takes a few seconds; MAX_QUEUE_DEPTH makes it read the queue depth.
            ("LOOP", "true".into()),
            ("RATE", "1000".into()),
            ("MAX_QUEUE_DEPTH", "10000".into()),
            ("METRICS_PORT", streamer_port.to_string()),
        ]),
        logs.path(),
    );

    // The gateway in process.
    let config =
        telemetry_gateway::GatewayConfig::from_vars(common(&[]).into_iter().map(|(k, v)| (k.to_string(), v)))
            .expect("gateway config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gateway = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let gateway_task = tokio::spawn(telemetry_gateway::run(
        config,
        listener,
        client.clone(),
        stop.clone(),
    ));

    // Prometheus, from the deploy file with this machine's targets, receiving remote write like
    // compose's.
    let collector_target = format!("127.0.0.1:{collector_port}");
    let exporter_port = free_port().expect("port");
    let targets = BTreeMap::from([
        ("gpu-telemetry", gateway.clone()),
        ("telemetry-gateway", gateway.clone()),
        ("telemetry-streamer", format!("127.0.0.1:{streamer_port}")),
        ("telemetry-collector", collector_target.clone()),
        ("telemetry-exporter", format!("127.0.0.1:{exporter_port}")),
        ("etcd", etcd.endpoint()),
    ]);
    let server = PrometheusServer::start(PrometheusOptions {
        config: Some(local_config(&targets)),
        remote_write_receiver: true,
        ..PrometheusOptions::default()
    })
    .await
    .expect("Prometheus starts");
    promtool(&["check", "config", &server.config_file().display().to_string()]);
    let api = Api {
        http: reqwest::Client::new(),
        base: server.url(),
    };
    // The exporter, remote-writing the stored telemetry into the same Prometheus: as in
    // compose, every fleet series is then there twice (scraped, and remote-written).
    let exporter = Process::start(
        &bins,
        "telemetry-exporter",
        &common(&[
            ("REMOTE_WRITE_URL", format!("{}/api/v1/write", server.url())),
            ("EXPORTER_NAME", "prometheus".into()),
            ("EXPORTER_ID", "exporter-1".into()),
            ("LEASE_TTL", "5s".into()),
            ("METRICS_PORT", exporter_port.to_string()),
        ]),
        logs.path(),
    );
    let context = |what: &str| {
        format!(
            "{what}\n--- collector log:\n{}\n--- streamer log:\n{}\n--- exporter log:\n{}\n--- \
             Prometheus log:\n{}",
            collector.log(),
            streamer.log(),
            exporter.log(),
            server.log()
        )
    };

    // Every target is up, and its `up` sample is stored (a target's health is reported a moment
    // before its scrape is committed).
    let want_jobs: BTreeSet<String> = targets.keys().map(|j| j.to_string()).collect();
    let jobs_up = || async {
        api.query("up == 1")
            .await
            .iter()
            .map(|s| s["metric"]["job"].as_str().expect("job").to_string())
            .collect::<BTreeSet<String>>()
    };
    let all_up = eventually(Duration::from_secs(30), || async {
        let data = api.get("/api/v1/targets", &[]).await;
        let active = data["activeTargets"].as_array().cloned().unwrap_or_default();
        active.len() == targets.len()
            && active.iter().all(|t| t["health"] == "up")
            && jobs_up().await == want_jobs
    })
    .await;
    assert!(
        all_up,
        "{}",
        context(&format!("targets: {}", api.get("/api/v1/targets", &[]).await))
    );

    // A queue entry that is not JSON, planted once the collector's dead-letter counter has been
    // scraped at zero: the collector dead-letters it, and the counter's increase shows.
    let zero = eventually(Duration::from_secs(10), || async {
        api.scalar("collector_dead_lettered_total").await == Some(0.0)
    })
    .await;
    assert!(
        zero,
        "{}",
        context("collector_dead_lettered_total is not scraped at 0")
    );
    let bad = Keyspace::new(NS).queue_entry(partition_of(b"planted/0"), &ulid::Ulid::generate().to_string());
    client.clone().put(bad, "{ not json", None).await.expect("put");

    // The whole sample reached Prometheus: 247 GPUs, 10 metrics each.
    let all = eventually(Duration::from_secs(40), || async {
        api.scalar(&format!("count({FLEET})")).await == Some((GPUS * METRICS) as f64)
    })
    .await;
    assert!(all, "{}", context("the sample's 2470 series were not scraped"));
    // The exporter's copy: the same series without a job label. Together, a selector without a
    // job counts every GPU twice; the dashboard picks one source (its `job` variable).
    let exported = eventually(Duration::from_secs(40), || async {
        api.scalar("count({job=\"\", __name__=~\"DCGM_FI_.+\"})").await == Some((GPUS * METRICS) as f64)
    })
    .await;
    assert!(
        exported,
        "{}",
        context("the exporter did not remote-write the sample's 2470 series")
    );
    assert_eq!(
        api.scalar("count(DCGM_FI_DEV_GPU_UTIL)").await,
        Some(2.0 * GPUS as f64),
        "scraped and remote-written"
    );
    let expected = sample();
    let series = api.query(FLEET).await;
    assert_eq!(series.len(), expected.len());
    for s in &series {
        let m = &s["metric"];
        let label = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        let key = (label("__name__"), label("Hostname"), label("gpu"));
        let row = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} is not in the sample: {m}"));
        let got: f64 = s["value"][1].as_str().expect("value").parse().expect("number");
        assert_eq!(got, row.value, "{key:?}");
        assert_eq!(
            (label("UUID"), label("device"), label("modelName")),
            (row.uuid.clone(), row.device.clone(), row.model.clone()),
            "{key:?}"
        );
        assert_eq!(
            label("DCGM_FI_DRIVER_VERSION"),
            "535.129.03",
            "labels_raw kept: {m}"
        );
        assert_eq!(
            (label("job"), label("instance")),
            ("gpu-telemetry".into(), gateway.clone())
        );
        let names: Vec<&String> = m.as_object().expect("labels").keys().collect();
        assert!(!names.iter().any(|n| n.starts_with("exported_")), "{m}");
    }

    // Every alert rule of alerts.yml is loaded and evaluates cleanly.
    let wanted: BTreeSet<String> = alert_rules().iter().map(|r| text(&r["alert"])).collect();
    let rules = || async {
        let data = api.get("/api/v1/rules", &[]).await;
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                let health = r["health"].as_str().unwrap_or_default().to_string();
                let error = r["lastError"].as_str().unwrap_or_default().to_string();
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    (health, error),
                )
            })
            .collect::<BTreeMap<String, (String, String)>>()
    };
    let healthy = eventually(Duration::from_secs(15), || async {
        let rules = rules().await;
        !rules.is_empty() && rules.values().all(|(health, _)| health == "ok")
    })
    .await;
    let loaded = rules().await;
    assert_eq!(
        loaded.keys().cloned().collect::<BTreeSet<_>>(),
        wanted,
        "rules loaded"
    );
    assert!(
        healthy && loaded.values().all(|(health, _)| health == "ok"),
        "rules not all healthy: {loaded:?}"
    );

    // The planted dead letter and the sample's nearly full GPUs make their alerts active; the
    // healthy parts stay quiet.
    let full: BTreeSet<(String, String)> = expected
        .iter()
        .filter(|((metric, _, _), _)| metric == "DCGM_FI_DEV_FB_USED")
        .filter(|((_, host, gpu), used)| {
            let free = &expected[&("DCGM_FI_DEV_FB_FREE".to_string(), host.clone(), gpu.clone())];
            used.value / (used.value + free.value) > 0.95
        })
        .map(|((_, host, gpu), _)| (host.clone(), gpu.clone()))
        .collect();
    assert!(!full.is_empty(), "the sample has nearly full GPUs");
    let active = || async {
        let data = api.get("/api/v1/alerts", &[]).await;
        data["alerts"].as_array().cloned().unwrap_or_default()
    };
    let named = |alerts: &[Json], name: &str| -> Vec<Json> {
        alerts
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| a["labels"].clone())
            .collect()
    };
    let fired = eventually(Duration::from_secs(20), || async {
        let alerts = active().await;
        !named(&alerts, "TelemetryDeadLetters").is_empty()
            && named(&alerts, "GpuFramebufferNearlyFull").len() == full.len()
    })
    .await;
    let alerts = active().await;
    assert!(fired, "{}", context(&format!("alerts: {alerts:?}")));
    let dead = named(&alerts, "TelemetryDeadLetters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["instance"], collector_target.as_str());
    assert_eq!(api.scalar("collector_dead_lettered_total").await, Some(1.0));
    let gpus: BTreeSet<(String, String)> = named(&alerts, "GpuFramebufferNearlyFull")
        .iter()
        .map(|l| {
            let get = |k: &str| l[k].as_str().expect(k).to_string();
            (get("Hostname"), get("gpu"))
        })
        .collect();
    assert_eq!(gpus, full);
    for quiet in [
        "TelemetryTargetDown",
        "TelemetryNoGpuMetrics",
        "TelemetryFenceRefusals",
        "EtcdBackendNearQuota",
        "EtcdBackendQuotaCritical",
        "GpuTemperatureHigh",
        "GpuXidErrors",
    ] {
        assert!(named(&alerts, quiet).is_empty(), "{quiet} is active: {alerts:?}");
    }

    // Every panel query of the dashboard returns data, with each source (the `job` variable)
    // and the other variables set to real values (the first host and its first GPU, as Grafana
    // lists them) and to "All"; with either source, "GPUs reporting" counts each GPU once.
    let dash = dashboard();
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let mut queries = Vec::new();
    for source in source_options(&dash) {
        let hosts = api
            .label_values(&variable_query(&vars[2]).replace("$job", &source))
            .await;
        assert_eq!(hosts.len(), 31, "source {source}: {hosts:?}");
        let host = hosts[0].clone();
        let gpu_query = variable_query(&vars[3])
            .replace("$job", &source)
            .replace("$Hostname", &host);
        let gpu_ids = api.label_values(&gpu_query).await;
        assert!(!gpu_ids.is_empty(), "{gpu_query}");
        let gpu = gpu_ids[0].clone();
        for (hostname, gpu) in [(host.as_str(), gpu.as_str()), (".*", ".*")] {
            for panel in panels(&dash) {
                for target in panel["targets"].as_array().expect("targets") {
                    let template = target["expr"]
                        .as_str()
                        .expect("expr")
                        .replace("$__rate_interval", "1m")
                        .replace("$Hostname", hostname)
                        .replace("$gpu", gpu);
                    assert!(
                        !template.replace("$job", "").contains('$'),
                        "unknown variable in {template}"
                    );
                    let expr = template.replace("$job", &source);
                    queries.push((panel["title"].to_string(), expr.clone()));
                    if panel["title"] == "GPUs reporting" && hostname == ".*" {
                        assert_eq!(
                            api.scalar(&expr).await,
                            Some(GPUS as f64),
                            "source {source}: {expr}"
                        );
                    }
                }
            }
        }
    }
    let without_data = || async {
        let mut failures = Vec::new();
        for (title, expr) in &queries {
            if api.query(expr).await.is_empty() {
                failures.push(format!("{title}: {expr}"));
            }
        }
        failures
    };
    // A series that appears with its first event (the gateway's request counters appear after
    // the first scrape) needs two more scrapes before rate() has two samples.
    eventually(Duration::from_secs(15), || async {
        without_data().await.is_empty()
    })
    .await;
    let failures = without_data().await;
    assert!(
        failures.is_empty(),
        "panel queries without data:\n{}",
        failures.join("\n")
    );
    // "All" means the whole fleet, of one source.
    let all_gpus = "count(DCGM_FI_DEV_GPU_UTIL{job=~\"gpu-telemetry\", Hostname=~\".*\", gpu=~\".*\"})";
    assert_eq!(api.scalar(all_gpus).await, Some(GPUS as f64));
    println!(
        "{} panel queries answered; {} alert rules healthy; {:.1} s",
        queries.len(),
        wanted.len(),
        started.elapsed().as_secs_f64()
    );

    stop.cancel();
    gateway_task
        .await
        .expect("joins")
        .expect("the gateway ran cleanly");
    drop(exporter);
    drop(streamer);
    drop(collector);
}
