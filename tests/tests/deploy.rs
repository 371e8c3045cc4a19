//! The deploy files and the binaries agree: every environment variable that
//! `deploy/compose.yaml` or `deploy/k8s/*.yaml` sets for one of our binaries is a variable that
//! binary reads (derived from its config struct, not from a list kept by hand), and the values
//! set there make a valid configuration; a `*_FILE` variable names a file of a Secret the
//! container mounts.
//!
//! The Kubernetes manifests, and the Secrets `scripts/k8s-secrets` makes for them, pass
//! `kubernetes-validate --strict` (the API's OpenAPI schemas, offline; PyPI's
//! kubernetes-validate, which scripts/test installs; `KUBERNETES_VALIDATE_BIN` overrides), and
//! every pod meets the Pod Security "restricted" profile, checked here field by field: non-root,
//! no privilege escalation, every capability dropped, the runtime's seccomp profile, a read-only
//! root file system, only the volume types the profile allows. Only the pipeline's pods reach
//! etcd's client port, etcd and the gateway have PodDisruptionBudgets, and every service is
//! probed on `/livez` and `/readyz` on the port it serves them on. And the etcd StatefulSet's
//! environment, run here as three real members with the certificate of scripts/k8s-secrets,
//! forms a cluster over mutual peer TLS and answers the probes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn accepted(binary: &str) -> Vec<String> {
    match binary {
        "telemetry-streamer" => telemetry_streamer::StreamerConfig::env_vars(),
        "telemetry-collector" => telemetry_collector::CollectorConfig::env_vars(),
        "telemetry-gateway" => telemetry_gateway::GatewayConfig::env_vars(),
        "telemetry-exporter" => telemetry_exporter::ExporterConfig::env_vars(),
        other => panic!("deploy files run an unknown binary {other:?}"),
    }
}

/// Loads the binary's configuration from exactly these variables.
fn load(binary: &str, vars: &BTreeMap<String, String>) -> Result<(), String> {
    let sample = root().join("data/dcgm_sample.csv").display().to_string();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| {
            // The image holds the sample at /data; here it is in the repo.
            let v = if v == "/data/dcgm_sample.csv" {
                sample.clone()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let result = match binary {
        "telemetry-streamer" => {
            telemetry_streamer::StreamerConfig::from_vars(vars, &telemetry_streamer::Flags::default())
                .map(|_| ())
        }
        "telemetry-collector" => telemetry_collector::CollectorConfig::from_vars(vars).map(|_| ()),
        "telemetry-gateway" => telemetry_gateway::GatewayConfig::from_vars(vars).map(|_| ()),
        "telemetry-exporter" => telemetry_exporter::ExporterConfig::from_vars(vars).map(|_| ()),
        other => panic!("unknown binary {other}"),
    };
    result.map_err(|e| e.to_string())
}

fn check(origin: &str, binary: &str, vars: &BTreeMap<String, String>) {
    let known = accepted(binary);
    let unknown: Vec<&String> = vars.keys().filter(|k| !known.contains(k)).collect();
    assert!(
        unknown.is_empty(),
        "{origin}: {binary} does not read {unknown:?} (it reads {known:?})"
    );
    if let Err(err) = load(binary, vars) {
        panic!("{origin}: {binary} rejects its deployed configuration: {err}");
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("environment value is not a scalar: {other:?}"),
    }
}

#[test]
fn compose_sets_only_variables_the_binaries_read() {
    let text = std::fs::read_to_string(root().join("deploy/compose.yaml")).expect("compose.yaml");
    let mut doc: Value = serde_norway::from_str(&text).expect("compose.yaml parses");
    doc.apply_merge().expect("merge keys resolve");
    let services = doc["services"].as_mapping().expect("services");
    let mut checked = BTreeMap::new();
    for (name, service) in services {
        let name = scalar(name);
        let mut service = service.clone();
        service.apply_merge().expect("merge keys resolve");
        // Services without a command (etcd) or running another image's binary (Prometheus).
        let Some(binary) = service["command"][0]
            .as_str()
            .filter(|c| c.starts_with("telemetry-"))
            .map(str::to_string)
        else {
            continue;
        };
        let mut env = service["environment"].clone();
        env.apply_merge().expect("merge keys resolve");
        let vars: BTreeMap<String, String> = env
            .as_mapping()
            .unwrap_or_else(|| panic!("{name}: environment must be a map"))
            .iter()
            .map(|(k, v)| (scalar(k), scalar(v)))
            .collect();
        check(&format!("compose service {name}"), &binary, &vars);
        *checked.entry(binary).or_insert(0) += 1;
    }
    assert_eq!(checked.get("telemetry-streamer"), Some(&2), "{checked:?}");
    assert_eq!(checked.get("telemetry-collector"), Some(&3), "{checked:?}");
    assert_eq!(checked.get("telemetry-gateway"), Some(&1), "{checked:?}");
    assert_eq!(checked.get("telemetry-exporter"), Some(&2), "{checked:?}");
    let etcd = services.keys().filter(|k| scalar(k).starts_with("etcd-")).count();
    assert_eq!(etcd, 3, "a 3-member etcd cluster");
}

/// Every `deploy/k8s/*.yaml`, in name order.
fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of these YAML files.
fn documents(files: &[PathBuf]) -> Vec<Value> {
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("read");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

#[test]
fn kubernetes_manifests_set_only_variables_the_binaries_read() {
    let docs = documents(&k8s_files());
    let config_maps: BTreeMap<String, BTreeMap<String, String>> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| {
            let data = d["data"]
                .as_mapping()
                .map(|m| m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect())
                .unwrap_or_default();
            (scalar(&d["metadata"]["name"]), data)
        })
        .collect();
    let mut kinds = BTreeMap::new();
    let mut binaries = std::collections::BTreeSet::new();
    for doc in &docs {
        *kinds.entry(scalar(&doc["kind"])).or_insert(0) += 1;
        let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_sequence() else {
            continue;
        };
        let name = scalar(&doc["metadata"]["name"]);
        for container in containers {
            let Some(binary) = container["command"][0].as_str() else {
                continue;
            };
            let mut vars = BTreeMap::new();
            for source in container["envFrom"].as_sequence().into_iter().flatten() {
                let map = scalar(&source["configMapRef"]["name"]);
                let data = config_maps
                    .get(&map)
                    .unwrap_or_else(|| panic!("{name}: ConfigMap {map} is not defined"));
                vars.extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            for var in container["env"].as_sequence().into_iter().flatten() {
                // Values from the downward API are pod names.
                let value = if var["valueFrom"].is_null() {
                    scalar(&var["value"])
                } else {
                    "pod-0".into()
                };
                vars.insert(scalar(&var["name"]), value);
            }
            check(&format!("k8s {name}"), binary, &vars);
            check_files(&format!("k8s {name}"), doc, container, &vars);
            binaries.insert(binary.to_string());
            let probes = ["readinessProbe", "livenessProbe"];
            assert!(
                probes.iter().any(|p| !container[*p].is_null()),
                "k8s {name}: no health probe"
            );
            assert!(
                !container["resources"]["requests"].is_null(),
                "k8s {name}: no resource requests"
            );
        }
    }
    assert!(kinds.contains_key("PodDisruptionBudget"), "{kinds:?}");
    for binary in [
        "telemetry-streamer",
        "telemetry-collector",
        "telemetry-gateway",
        "telemetry-exporter",
    ] {
        assert!(
            binaries.contains(binary),
            "no k8s workload runs {binary}: {binaries:?}"
        );
    }
    assert!(kinds.contains_key("StatefulSet"), "{kinds:?}");
}

#[test]
fn the_image_builds_binaries_that_exist() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    for bin in [
        "telemetry-streamer",
        "telemetry-collector",
        "telemetry-gateway",
        "telemetry-exporter",
        "telemetry-admin",
    ] {
        assert!(
            dockerfile.contains(&format!("--bin {bin}")),
            "Dockerfile does not build {bin}"
        );
    }
    // scripts/image (the registry-free image) copies the same five.
    let script = std::fs::read_to_string(root().join("scripts/image")).expect("scripts/image");
    let listed = script
        .lines()
        .find_map(|l| l.strip_prefix("BINARIES=("))
        .expect("scripts/image lists its BINARIES");
    assert_eq!(
        listed
            .trim_end_matches(')')
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "telemetry-streamer",
            "telemetry-collector",
            "telemetry-gateway",
            "telemetry-exporter",
            "telemetry-admin"
        ]
    );
    for package in ["streamer", "collector", "gateway", "exporter", "admin"] {
        let manifest =
            std::fs::read_to_string(root().join(format!("services/{package}/Cargo.toml"))).expect("manifest");
        assert!(manifest.contains(&format!("name = \"telemetry-{package}\"")));
    }
}

/// Every `*_FILE` variable names a file inside a read-only mount of a Secret volume, and that
/// Secret has the file as a key (the mounted file is the key's name), so the binary finds it.
fn check_files(origin: &str, workload: &Value, container: &Value, vars: &BTreeMap<String, String>) {
    let volumes = &workload["spec"]["template"]["spec"]["volumes"];
    for (var, path) in vars.iter().filter(|(k, _)| k.ends_with("_FILE")) {
        let path = Path::new(path);
        let mount = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| path.parent() == Some(Path::new(&scalar(&m["mountPath"]))))
            .unwrap_or_else(|| panic!("{origin}: {var}={} is in no volume mount", path.display()));
        assert_eq!(mount["readOnly"], Value::Bool(true), "{origin}: {var}'s mount");
        let volume = volumes
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{origin}: no volume {:?}", mount["name"]));
        let secret = scalar(&volume["secret"]["secretName"]);
        assert!(!secret.is_empty(), "{origin}: {var} is not from a Secret");
        let file = path.file_name().expect("file name").to_string_lossy().to_string();
        let keys = secret_keys();
        assert!(
            keys.get(&secret).is_some_and(|k| k.contains(&file)),
            "{origin}: {var} reads {file} of Secret {secret}, which scripts/k8s-secrets does not \
             make ({keys:?})"
        );
    }
}

/// Runs scripts/k8s-secrets into a temporary directory; returns the manifest file it printed.
fn secrets_manifest(dir: &Path) -> PathBuf {
    let out = Command::new(root().join("scripts/k8s-secrets"))
        .arg(dir.join("material"))
        .output()
        .expect("run scripts/k8s-secrets");
    assert!(
        out.status.success(),
        "scripts/k8s-secrets failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.join("secrets.yaml");
    std::fs::write(&file, &out.stdout).expect("write");
    file
}

/// The Secrets scripts/k8s-secrets makes: name → keys (made once per test binary).
fn secret_keys() -> &'static BTreeMap<String, BTreeSet<String>> {
    static KEYS: std::sync::OnceLock<BTreeMap<String, BTreeSet<String>>> = std::sync::OnceLock::new();
    KEYS.get_or_init(make_secrets)
}

fn make_secrets() -> BTreeMap<String, BTreeSet<String>> {
    let dir = tempfile::tempdir().expect("temp dir");
    documents(&[secrets_manifest(dir.path())])
        .iter()
        .map(|d| {
            assert_eq!(d["kind"], "Secret");
            assert_eq!(d["metadata"]["namespace"], "gpu-telemetry");
            let keys = d["data"].as_mapping().expect("data").keys().map(scalar).collect();
            (scalar(&d["metadata"]["name"]), keys)
        })
        .collect()
}

#[test]
fn kubernetes_manifests_pass_the_api_schemas_and_the_restricted_profile() {
    // The schemas: every manifest and the Secrets, against the oldest Kubernetes these files are
    // written for and against the newest the validator knows.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = k8s_files();
    files.push(secrets_manifest(dir.path()));
    let bin = std::env::var("KUBERNETES_VALIDATE_BIN").unwrap_or_else(|_| "kubernetes-validate".into());
    for version in [Some("1.30.0"), None] {
        let mut cmd = Command::new(&bin);
        cmd.args(["--strict", "--quiet"]);
        if let Some(version) = version {
            cmd.args(["-k", version]);
        }
        let out = cmd.args(&files).output().unwrap_or_else(|e| {
            panic!("cannot run {bin} (scripts/test installs it: pip install kubernetes-validate): {e}")
        });
        assert!(
            out.status.success(),
            "kubernetes-validate {version:?} refuses the manifests:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let docs = documents(&k8s_files());
    let of_kind = |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
    let namespace = of_kind("Namespace");
    assert_eq!(
        namespace[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted",
        "the namespace enforces the restricted profile"
    );
    let secrets = secret_keys();

    // The restricted profile, field by field, on every pod.
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| !d["spec"]["template"]["spec"].is_null())
        .collect();
    assert_eq!(workloads.len(), 5, "etcd, streamer, collector, gateway, exporter");
    let mut clients = BTreeSet::new();
    for workload in &workloads {
        let name = scalar(&workload["metadata"]["name"]);
        let pod = &workload["spec"]["template"]["spec"];
        let pod_sec = &pod["securityContext"];
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host], Value::Bool(true), "{name}: {host}");
        }
        assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false), "{name}");
        for volume in pod["volumes"].as_sequence().into_iter().flatten() {
            let volume_name = scalar(&volume["name"]);
            let kinds: Vec<String> = volume
                .as_mapping()
                .expect("volume")
                .keys()
                .map(scalar)
                .filter(|k| k != "name")
                .collect();
            assert!(
                kinds.iter().all(|k| [
                    "configMap",
                    "csi",
                    "downwardAPI",
                    "emptyDir",
                    "ephemeral",
                    "persistentVolumeClaim",
                    "projected",
                    "secret"
                ]
                .contains(&k.as_str())),
                "{name}: volume {volume_name} is {kinds:?}, not allowed by the restricted profile"
            );
            if !volume["secret"].is_null() {
                let secret = scalar(&volume["secret"]["secretName"]);
                assert!(
                    secrets.contains_key(&secret),
                    "{name}: Secret {secret} is not made by scripts/k8s-secrets"
                );
            }
        }
        let containers: Vec<&Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod[*k].as_sequence().into_iter().flatten())
            .collect();
        assert!(!containers.is_empty(), "{name}: no containers");
        for container in containers {
            let sec = &container["securityContext"];
            let field = |f: &str| {
                if sec[f].is_null() {
                    pod_sec[f].clone()
                } else {
                    sec[f].clone()
                }
            };
            assert_eq!(field("runAsNonRoot"), Value::Bool(true), "{name}: runAsNonRoot");
            let user = field("runAsUser");
            assert!(
                user.is_null() || user.as_u64().is_some_and(|u| u != 0),
                "{name}: runAsUser {user:?}"
            );
            assert_eq!(
                field("seccompProfile")["type"],
                "RuntimeDefault",
                "{name}: seccompProfile"
            );
            assert_eq!(
                sec["allowPrivilegeEscalation"],
                Value::Bool(false),
                "{name}: allowPrivilegeEscalation"
            );
            assert_ne!(sec["privileged"], Value::Bool(true), "{name}: privileged");
            let dropped: Vec<String> = sec["capabilities"]["drop"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(scalar)
                .collect();
            assert_eq!(dropped, ["ALL"], "{name}: capabilities.drop");
            assert!(
                sec["capabilities"]["add"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .all(|c| c == "NET_BIND_SERVICE"),
                "{name}: capabilities.add"
            );
            // None of these processes writes outside its volumes.
            assert_eq!(
                sec["readOnlyRootFilesystem"],
                Value::Bool(true),
                "{name}: readOnlyRootFilesystem"
            );
            if container["command"][0]
                .as_str()
                .is_some_and(|c| c.starts_with("telemetry-"))
            {
                check_probes(&name, container, &docs);
                let labels = &workload["spec"]["template"]["metadata"]["labels"];
                assert_eq!(labels["etcd-client"], "true", "{name}: may reach etcd");
                clients.insert(scalar(&labels["app"]));
            }
        }
    }
    assert_eq!(
        clients,
        BTreeSet::from(["collector", "exporter", "gateway", "streamer"].map(String::from))
    );

    // Only pods labelled etcd-client (and the members themselves) reach etcd's client port.
    let policies = of_kind("NetworkPolicy");
    let etcd = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"]["app"] == "etcd")
        .expect("a NetworkPolicy selecting the etcd pods");
    let types: Vec<String> = etcd["spec"]["policyTypes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(scalar)
        .collect();
    assert_eq!(types, ["Ingress"]);
    for rule in etcd["spec"]["ingress"].as_sequence().expect("ingress rules") {
        let ports: Vec<u64> = rule["ports"]
            .as_sequence()
            .expect("every rule names its ports")
            .iter()
            .map(|p| p["port"].as_u64().expect("numeric port"))
            .collect();
        if !ports.contains(&2379) && !ports.contains(&2380) {
            continue;
        }
        let from: Vec<&Value> = rule["from"]
            .as_sequence()
            .expect("clients are selected")
            .iter()
            .collect();
        for peer in from {
            assert!(
                peer["namespaceSelector"].is_null() && peer["ipBlock"].is_null(),
                "{peer:?}"
            );
            let labels = &peer["podSelector"]["matchLabels"];
            assert!(
                (labels["etcd-client"] == "true" && !ports.contains(&2380)) || labels["app"] == "etcd",
                "etcd port {ports:?} open to {labels:?}"
            );
        }
    }

    // Voluntary evictions leave etcd its quorum and the gateway a replica.
    let budgets: BTreeSet<String> = of_kind("PodDisruptionBudget")
        .iter()
        .map(|p| scalar(&p["spec"]["selector"]["matchLabels"]["app"]))
        .collect();
    for app in ["etcd", "gateway", "collector"] {
        assert!(
            budgets.contains(app),
            "no PodDisruptionBudget for {app}: {budgets:?}"
        );
    }
}

/// `/readyz` and `/livez` probes on the container port whose number the binary serves them on
/// (METRICS_PORT, or the gateway's GATEWAY_PORT), from the ConfigMaps the container reads.
fn check_probes(name: &str, container: &Value, docs: &[Value]) {
    let binary = scalar(&container["command"][0]);
    let port_var = if binary == "telemetry-gateway" {
        "GATEWAY_PORT"
    } else {
        "METRICS_PORT"
    };
    let served = container["envFrom"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            docs.iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == s["configMapRef"]["name"])
        })
        .find_map(|m| m["data"][port_var].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{name}: {port_var} is not set"));
    let ports: BTreeMap<String, String> = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| (scalar(&p["name"]), scalar(&p["containerPort"])))
        .collect();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{name}: {probe}");
        let port = scalar(&get["port"]);
        let number = ports.get(&port).cloned().unwrap_or(port);
        assert_eq!(number, served, "{name}: {probe} on {port_var}");
    }
}

/// A process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `20-etcd.yaml`'s member environment for member `i` of 3 on this machine: the pod name
/// resolved, every member's address (`etcd-N.etcd`, `$(POD_NAME).etcd`, `0.0.0.0`) made
/// 127.0.0.1 with that member's own ports in place of 2379, 2380 and 2381, and the volumes'
/// mount paths moved under `mounts`.
fn local_member_env(
    env: &[(String, String)],
    i: usize,
    ports: &[[u16; 3]],
    mounts: &[(String, PathBuf)],
) -> Vec<(String, String)> {
    let pod = format!("etcd-{i}");
    let address = |item: &str| -> String {
        let (prefix, url) = match item.split_once('=') {
            Some((name, url)) if url.contains("://") => (format!("{name}="), url),
            _ => (String::new(), item),
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return item.to_string();
        };
        let (host, port) = rest.rsplit_once(':').expect("host:port");
        let member = match host {
            "0.0.0.0" => i,
            _ => host
                .strip_suffix(".etcd")
                .and_then(|h| h.strip_prefix("etcd-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("20-etcd.yaml: unexpected host {host}")),
        };
        let slot = match port {
            "2379" => 0,
            "2380" => 1,
            "2381" => 2,
            other => panic!("20-etcd.yaml: unexpected port {other}"),
        };
        format!("{prefix}{scheme}://127.0.0.1:{}", ports[member][slot])
    };
    env.iter()
        .map(|(name, value)| {
            let mut value = value.replace("$(POD_NAME)", &pod);
            if value.contains("://") {
                value = value.split(',').map(address).collect::<Vec<_>>().join(",");
            }
            for (mount, dir) in mounts {
                if let Some(rest) = value.strip_prefix(mount.as_str()) {
                    value = format!("{}{rest}", dir.display());
                }
            }
            (name.clone(), value)
        })
        .collect()
}

/// etcd as `20-etcd.yaml` configures it, run here: three members with the StatefulSet's
/// environment (addresses and paths moved to this machine) and the certificate of
/// scripts/k8s-secrets form one cluster over mutual peer TLS, and answer the probes' `/readyz`
/// and `/livez` on the metrics listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_etcd_members_form_a_cluster_over_peer_tls() {
    use base64::Engine as _;

    let docs = documents(&k8s_files());
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "etcd")
        .expect("the etcd StatefulSet");
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas") as usize;
    assert_eq!(replicas, 3);
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter(|v| v["valueFrom"].is_null())
        .map(|v| (scalar(&v["name"]), scalar(&v["value"])))
        .collect();

    // The Secret's files, as the volume would mount them.
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = documents(&[secrets_manifest(dir.path())]);
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        let name = scalar(&mount["name"]);
        let path = scalar(&mount["mountPath"]);
        let volume = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| scalar(&v["name"]) == name);
        let local = dir.path().join(&name);
        std::fs::create_dir_all(&local).expect("mkdir");
        if let Some(volume) = volume {
            let secret_name = scalar(&volume["secret"]["secretName"]);
            let secret = secrets
                .iter()
                .find(|s| s["metadata"]["name"] == secret_name.as_str())
                .unwrap_or_else(|| panic!("no Secret {secret_name}"));
            for (key, value) in secret["data"].as_mapping().expect("data") {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(scalar(value))
                    .expect("base64");
                std::fs::write(local.join(scalar(key)), bytes).expect("write");
            }
        }
        mounts.push((path, local));
    }
    // One data volume per member.
    let ports: Vec<[u16; 3]> = (0..replicas)
        .map(|_| [0; 3].map(|_| telemetry_harness::free_port().expect("port")))
        .collect();
    let binary = telemetry_harness::etcd_binary().expect("etcd binary");
    let mut members = Vec::new();
    for i in 0..replicas {
        let member_dir = dir.path().join(format!("etcd-{i}"));
        let mounts: Vec<(String, PathBuf)> = mounts
            .iter()
            .map(|(path, local)| {
                if path == "/var/lib/etcd" {
                    (path.clone(), member_dir.clone())
                } else {
                    (path.clone(), local.clone())
                }
            })
            .collect();
        std::fs::create_dir_all(&member_dir).expect("mkdir");
        let vars = local_member_env(&env, i, &ports, &mounts);
        let log = std::fs::File::create(dir.path().join(format!("etcd-{i}.log"))).expect("log");
        let mut cmd = Command::new(&binary);
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETCD_")) {
            cmd.env_remove(name);
        }
        let child = cmd
            .envs(vars)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        members.push(Killed(child));
    }
    let logs = || {
        (0..replicas)
            .map(|i| {
                let log =
                    std::fs::read_to_string(dir.path().join(format!("etcd-{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- etcd-{i}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The probes' endpoints on each member's metrics listener.
    let http = reqwest::Client::new();
    for path in ["/readyz", "/livez"] {
        let all = telemetry_harness::eventually(std::time::Duration::from_secs(30), || async {
            for port in &ports {
                let url = format!("http://127.0.0.1:{}{path}", port[2]);
                match http.get(&url).send().await {
                    Ok(resp) if resp.status().is_success() => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        assert!(all, "{path} never answered 200 on every member\n{}", logs());
    }

    // One cluster of three, peers on https, and a write through one member is read through
    // another (replicated over the peers' TLS).
    let mut client = etcd_client::Client::connect([format!("127.0.0.1:{}", ports[0][0])], None)
        .await
        .expect("connect");
    let list = client.member_list().await.expect("member list");
    let peers: Vec<String> = list
        .members()
        .iter()
        .flat_map(|m| m.peer_urls().to_vec())
        .collect();
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert!(peers.iter().all(|u| u.starts_with("https://")), "{peers:?}");
    client.put("deploy-test", "over-tls", None).await.expect("put");
    let mut other = etcd_client::Client::connect([format!("127.0.0.1:{}", ports[2][0])], None)
        .await
        .expect("connect");
    let got = other.get("deploy-test", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"over-tls");
    drop(members);
}
