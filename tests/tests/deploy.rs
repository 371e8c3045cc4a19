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
//! probed on `/livez` and `/readyz` on the port it serves them on. etcd serves clients over TLS
//! with client-certificate auth, every pipeline pod logs in as its own service's user with only
//! its own password Secret mounted, and the Job `etcd-auth-setup` makes those users. And the
//! etcd StatefulSet's environment, run here as three real members with the certificates of
//! scripts/k8s-secrets, forms a cluster over mutual peer TLS, answers the probes, and, after the
//! Job has run for real, serves each pipeline pod's environment as its own user.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_norway::Value;

telemetry_shared::env_config! {
    /// The variables telemetry-admin reads (its `RawAdminConfig`: where etcd is, and logging).
    struct RawAdmin {
        flatten common: telemetry_shared::config::RawCommonConfig;
        flatten log: telemetry_shared::config::RawLogConfig;
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn accepted(binary: &str) -> Vec<String> {
    match binary {
        "telemetry-streamer" => telemetry_streamer::StreamerConfig::env_vars(),
        "telemetry-collector" => telemetry_collector::CollectorConfig::env_vars(),
        "telemetry-gateway" => telemetry_gateway::GatewayConfig::env_vars(),
        "telemetry-exporter" => telemetry_exporter::ExporterConfig::env_vars(),
        "telemetry-admin" => telemetry_shared::config::var_names::<RawAdmin>(),
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
        "telemetry-admin" => telemetry_shared::config::from_iter::<RawAdmin, _>(vars).and_then(|raw| {
            telemetry_shared::CommonConfig::try_from(&raw.common)?;
            telemetry_shared::config::LogConfig::try_from(&raw.log).map(|_| ())
        }),
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
            let vars = container_env(&docs, container);
            check(&format!("k8s {name}"), binary, &vars);
            check_files(&format!("k8s {name}"), doc, container, &vars);
            binaries.insert(binary.to_string());
            // A Job runs to its end: nothing to probe.
            let probes = ["readinessProbe", "livenessProbe"];
            assert!(
                doc["kind"] == "Job" || probes.iter().any(|p| !container[*p].is_null()),
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
        "telemetry-admin",
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
            keys.get(&secret).is_some_and(|k| k.contains_key(&file)),
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

/// A Secret's data: key → value.
type SecretData = BTreeMap<String, Vec<u8>>;

/// The Secrets scripts/k8s-secrets makes: name → data (made once per test binary).
fn secret_keys() -> &'static BTreeMap<String, SecretData> {
    static KEYS: std::sync::OnceLock<BTreeMap<String, SecretData>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        secrets_in(&secrets_manifest(dir.path()))
    })
}

/// The Secrets of a manifest printed by scripts/k8s-secrets, decoded: name → data.
fn secrets_in(manifest: &Path) -> BTreeMap<String, SecretData> {
    use base64::Engine as _;
    documents(&[manifest.to_path_buf()])
        .iter()
        .map(|d| {
            assert_eq!(d["kind"], "Secret");
            assert_eq!(d["metadata"]["namespace"], "gpu-telemetry");
            let data = d["data"]
                .as_mapping()
                .expect("data")
                .iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(scalar(v))
                        .expect("base64");
                    (scalar(k), bytes)
                })
                .collect();
            (scalar(&d["metadata"]["name"]), data)
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
    assert_eq!(
        workloads.len(),
        6,
        "etcd, streamer, collector, gateway, exporter, the auth-setup Job"
    );
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
            for secret in volume_secrets(volume) {
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
                if workload["kind"] != "Job" {
                    check_probes(&name, container, &docs);
                }
                let labels = &workload["spec"]["template"]["metadata"]["labels"];
                assert_eq!(labels["etcd-client"], "true", "{name}: may reach etcd");
                clients.insert(scalar(&labels["app"]));
            }
        }
    }
    assert_eq!(
        clients,
        BTreeSet::from(["collector", "etcd-auth-setup", "exporter", "gateway", "streamer"].map(String::from))
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

/// The Secrets a volume mounts: a `secret` volume's, or every `secret` source of a `projected`
/// one.
fn volume_secrets(volume: &Value) -> Vec<String> {
    let mut names = Vec::new();
    if !volume["secret"].is_null() {
        names.push(scalar(&volume["secret"]["secretName"]));
    }
    for source in volume["projected"]["sources"].as_sequence().into_iter().flatten() {
        if !source["secret"].is_null() {
            names.push(scalar(&source["secret"]["name"]));
        }
    }
    names
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

/// The ConfigMaps' data: name → variable → value.
fn config_maps(docs: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    docs.iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| {
            let data = d["data"]
                .as_mapping()
                .map(|m| m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect())
                .unwrap_or_default();
            (scalar(&d["metadata"]["name"]), data)
        })
        .collect()
}

/// A container's environment: its ConfigMaps' (each must be defined), then its own
/// (downward-API values as `pod-0`).
fn container_env(docs: &[Value], container: &Value) -> BTreeMap<String, String> {
    let maps = config_maps(docs);
    let mut vars = BTreeMap::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        let map = scalar(&source["configMapRef"]["name"]);
        let data = maps.get(&map).unwrap_or_else(|| {
            panic!(
                "container {}: ConfigMap {map} is not defined",
                scalar(&container["name"])
            )
        });
        vars.extend(data.clone());
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        let value = if var["valueFrom"].is_null() {
            scalar(&var["value"])
        } else {
            "pod-0".into()
        };
        vars.insert(scalar(&var["name"]), value);
    }
    vars
}

/// The Secret and key a file of a container comes from: the file's directory is a mount of a
/// `secret` volume (the key is the file's name) or of a `projected` one (the item whose path is
/// the file's name).
fn secret_of_file(pod: &Value, container: &Value, file: &str) -> Option<(String, String)> {
    let path = Path::new(file);
    let name = path.file_name()?.to_string_lossy().to_string();
    let mount = container["volumeMounts"]
        .as_sequence()?
        .iter()
        .find(|m| path.parent() == Some(Path::new(&scalar(&m["mountPath"]))))?;
    let volume = pod["volumes"]
        .as_sequence()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    if !volume["secret"].is_null() {
        return Some((scalar(&volume["secret"]["secretName"]), name));
    }
    volume["projected"]["sources"]
        .as_sequence()?
        .iter()
        .find_map(|source| {
            let item = source["secret"]["items"]
                .as_sequence()?
                .iter()
                .find(|i| scalar(&i["path"]) == name)?;
            Some((scalar(&source["secret"]["name"]), scalar(&item["key"])))
        })
}

/// The workloads running a pipeline service (not the Job), by service name (their `app` label).
fn pipeline_workloads(docs: &[Value]) -> BTreeMap<String, &Value> {
    docs.iter()
        .filter(|d| d["kind"] != "Job")
        .filter(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["command"][0]
                .as_str()
                .is_some_and(|c| c.starts_with("telemetry-"))
        })
        .map(|d| (scalar(&d["spec"]["template"]["metadata"]["labels"]["app"]), d))
        .collect()
}

/// The user name `telemetry-admin auth setup` gives `service` under the common ETCD_NAMESPACE.
fn service_user(docs: &[Value], service: &str) -> String {
    let namespace = config_maps(docs)["telemetry-common"]["ETCD_NAMESPACE"].clone();
    let prefix = telemetry_admin::auth::default_name_prefix(&telemetry_shared::Keyspace::new(&namespace));
    format!("{prefix}{service}")
}

/// etcd serves clients over TLS and wants a client certificate of its CA; every pipeline pod
/// dials it on `https://` with a client certificate and logs in as its own service's user (the
/// name `auth setup` gives it), with the password of its own Secret and no other Secret holding
/// a password; and the Job `etcd-auth-setup` runs `auth setup --enable` with each user's
/// password taken from that user's Secret.
#[test]
fn kubernetes_pods_use_etcd_over_tls_as_their_own_users() {
    let docs = documents(&k8s_files());
    let secrets = secret_keys();
    let common = &config_maps(&docs)["telemetry-common"];
    for endpoint in common["ETCD_ENDPOINTS"].split(',') {
        assert!(endpoint.starts_with("https://"), "ETCD_ENDPOINTS: {endpoint}");
    }
    let password_secrets: BTreeSet<&String> = secrets
        .keys()
        .filter(|n| n.starts_with("etcd-user-") || *n == "etcd-root")
        .collect();

    // Each pipeline pod as its own user.
    let workloads = pipeline_workloads(&docs);
    assert_eq!(
        workloads.keys().map(String::as_str).collect::<Vec<_>>(),
        ["collector", "exporter", "gateway", "streamer"]
    );
    for (service, workload) in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let vars = container_env(&docs, container);
        let user = service_user(&docs, service);
        assert_eq!(vars.get("ETCD_USERNAME"), Some(&user), "{service}");
        let own = format!("etcd-user-{service}");
        assert_eq!(
            secret_of_file(pod, container, &vars["ETCD_PASSWORD_FILE"]),
            Some((own.clone(), "password".into())),
            "{service}: ETCD_PASSWORD_FILE"
        );
        assert_eq!(
            secrets[&own].get("username").map(Vec::as_slice),
            Some(user.as_bytes()),
            "{service}: the Secret's user"
        );
        let mounted: BTreeSet<String> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(volume_secrets)
            .filter(|s| password_secrets.contains(s))
            .collect();
        assert_eq!(mounted, BTreeSet::from([own]), "{service}: password Secrets");
        for var in ["ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"] {
            let (secret, _) = secret_of_file(pod, container, &vars[var])
                .unwrap_or_else(|| panic!("{service}: {var} is not from a Secret"));
            assert_eq!(secret, "etcd-client-tls", "{service}: {var}");
        }
    }

    // etcd: TLS and client certificates on the client port, plain HTTP on the metrics one.
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "etcd")
        .expect("the etcd StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = container_env(&docs, container);
    for var in ["ETCD_LISTEN_CLIENT_URLS", "ETCD_ADVERTISE_CLIENT_URLS"] {
        assert!(
            env[var].split(',').all(|u| u.starts_with("https://")),
            "etcd {var}={}",
            env[var]
        );
    }
    assert_eq!(env["ETCD_CLIENT_CERT_AUTH"], "true");
    for var in ["ETCD_CERT_FILE", "ETCD_KEY_FILE", "ETCD_TRUSTED_CA_FILE"] {
        let (secret, key) = secret_of_file(pod, container, &env[var])
            .unwrap_or_else(|| panic!("etcd: {var} is not from a Secret"));
        assert_eq!(secret, "etcd-server-tls", "etcd {var}");
        assert!(secrets[&secret].contains_key(&key), "etcd {var}: no {key}");
    }
    assert_eq!(env["ETCD_LISTEN_METRICS_URLS"], "http://0.0.0.0:2381");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "etcd {probe}");
    }

    // The Job that makes the users, with every user's password from that user's Secret.
    let job = docs
        .iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == "etcd-auth-setup")
        .expect("the Job etcd-auth-setup");
    let pod = &job["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["command"][0], "telemetry-admin");
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(scalar)
        .collect();
    assert_eq!(args[..2], ["auth", "setup"], "{args:?}");
    assert!(args.iter().any(|a| a == "--enable"), "{args:?}");
    let dir = args
        .iter()
        .position(|a| a == "--password-dir")
        .map(|i| args[i + 1].clone())
        .expect("--password-dir");
    let vars = container_env(&docs, container);
    assert!(
        !vars.contains_key("ETCD_USERNAME"),
        "the Job logs in by its certificate (CN root): a password login is refused while \
         authentication is off"
    );
    assert_eq!(
        secret_of_file(pod, container, &vars["ETCD_CERT_FILE"]).map(|(s, _)| s),
        Some("etcd-root-tls".into())
    );
    let services = telemetry_shared::access::Service::ALL.map(|s| s.name().to_string());
    for (user, secret) in std::iter::once(("root".to_string(), "etcd-root".to_string())).chain(
        services
            .iter()
            .map(|s| (service_user(&docs, s), format!("etcd-user-{s}"))),
    ) {
        assert_eq!(
            secret_of_file(pod, container, &format!("{dir}/{user}")),
            Some((secret.clone(), "password".into())),
            "the Job's password of {user}"
        );
        assert_eq!(
            secrets[&secret].get("username").map(Vec::as_slice),
            Some(user.as_bytes()),
            "Secret {secret}"
        );
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

/// The first container of the `kind` named `name`.
fn container_of<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    &doc["spec"]["template"]["spec"]["containers"][0]
}

/// Where a container's volumes are on this machine: a Secret's files are in
/// `secrets/{secret}`, a projected volume's are copied into `scratch/{volume}`; other volumes
/// (etcd's data) are left to the caller.
fn local_mounts(pod: &Value, container: &Value, secrets: &Path, scratch: &Path) -> Vec<(String, PathBuf)> {
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_sequence().into_iter().flatten() {
        let name = scalar(&mount["name"]);
        let Some(volume) = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| scalar(&v["name"]) == name)
        else {
            continue;
        };
        let local = if !volume["secret"].is_null() {
            secrets.join(scalar(&volume["secret"]["secretName"]))
        } else if !volume["projected"].is_null() {
            let local = scratch.join(&name);
            std::fs::create_dir_all(&local).expect("mkdir");
            for source in volume["projected"]["sources"].as_sequence().expect("sources") {
                let secret = secrets.join(scalar(&source["secret"]["name"]));
                for item in source["secret"]["items"].as_sequence().expect("items") {
                    std::fs::copy(
                        secret.join(scalar(&item["key"])),
                        local.join(scalar(&item["path"])),
                    )
                    .expect("copy a projected file");
                }
            }
            local
        } else {
            continue;
        };
        mounts.push((scalar(&mount["mountPath"]), local));
    }
    mounts
}

/// `value` with a mount path at its start moved to where that volume is here.
fn relocate(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, dir) in mounts {
        if let Some(rest) = value.strip_prefix(mount.as_str()) {
            return format!("{}{rest}", dir.display());
        }
    }
    value.to_string()
}

/// A container's `ETCD_*` variables on this machine: the members' addresses made local (as for
/// the members themselves) and the mounted files moved to `mounts`.
fn local_etcd_env(
    docs: &[Value],
    container: &Value,
    ports: &[[u16; 3]],
    mounts: &[(String, PathBuf)],
) -> Vec<(String, String)> {
    let vars: Vec<(String, String)> = container_env(docs, container)
        .into_iter()
        .filter(|(k, _)| k.starts_with("ETCD_"))
        .collect();
    local_member_env(&vars, 0, ports, mounts)
}

/// The shared configuration these variables make.
fn common_config(vars: Vec<(String, String)>) -> telemetry_shared::CommonConfig {
    let raw: telemetry_shared::config::RawCommonConfig =
        telemetry_shared::config::from_iter(vars).expect("raw configuration");
    telemetry_shared::CommonConfig::try_from(raw).expect("a valid configuration")
}

/// etcd as `20-etcd.yaml` configures it, run here: three members with the StatefulSet's
/// environment (addresses and paths moved to this machine) and the certificates of
/// scripts/k8s-secrets form one cluster over mutual peer TLS, answer the probes' `/readyz` and
/// `/livez` on the plain-HTTP metrics listener, and serve clients over TLS only to a certificate
/// of their CA. The Job `etcd-auth-setup` (the real `telemetry-admin` with the Job's arguments
/// and files) makes the users and turns authentication on, and runs again without changing
/// anything; then every pipeline pod's environment connects as its own user, reads what its
/// role allows and is refused a write outside it, while the pipeline certificate without a user
/// gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_etcd_members_form_a_cluster_over_peer_tls() {
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

    // The Secrets' files, as their volumes would mount them.
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets_dir = dir.path().join("secrets");
    for (name, data) in secrets_in(&secrets_manifest(dir.path())) {
        std::fs::create_dir_all(secrets_dir.join(&name)).expect("mkdir");
        for (key, bytes) in data {
            std::fs::write(secrets_dir.join(&name).join(key), bytes).expect("write");
        }
    }
    let mounts = local_mounts(pod, container, &secrets_dir, &dir.path().join("etcd"));
    let data_mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == "data")
        .map(|m| scalar(&m["mountPath"]))
        .expect("the data volume's mount");
    // One data volume per member.
    let ports: Vec<[u16; 3]> = (0..replicas)
        .map(|_| [0; 3].map(|_| telemetry_harness::free_port().expect("port")))
        .collect();
    let binary = telemetry_harness::etcd_binary().expect("etcd binary");
    let mut members = Vec::new();
    for i in 0..replicas {
        let member_dir = dir.path().join(format!("etcd-{i}"));
        let mut mounts = mounts.clone();
        mounts.push((data_mount.clone(), member_dir.clone()));
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

    // etcd's client port wants TLS and a certificate of the CA: a client without one is refused.
    let common = local_etcd_env(&docs, container_of(&docs, "Job", "etcd-auth-setup"), &ports, &[]);
    let endpoints: Vec<String> = common
        .iter()
        .find(|(k, _)| k == "ETCD_ENDPOINTS")
        .map(|(_, v)| v.split(',').map(str::to_string).collect())
        .expect("ETCD_ENDPOINTS");
    assert!(
        endpoints.iter().all(|e| e.starts_with("https://127.0.0.1:")),
        "{endpoints:?}"
    );
    let ca = std::fs::read(secrets_dir.join("etcd-client-tls/ca.crt")).expect("ca.crt");
    let no_cert = etcd_client::ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_timeout(std::time::Duration::from_secs(3))
        .with_tls(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)));
    let refused = match etcd_client::Client::connect(&endpoints, Some(no_cert)).await {
        Ok(mut client) => client.get("deploy-test", None).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "etcd served a client without a certificate");

    // The Job, run as the binary with its arguments and environment: the users, their roles and
    // authentication; and once more, now as root by its certificate's CN, changing nothing.
    let job = docs
        .iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == "etcd-auth-setup")
        .expect("the Job");
    let job_pod = &job["spec"]["template"]["spec"];
    let job_container = &job_pod["containers"][0];
    let job_mounts = local_mounts(job_pod, job_container, &secrets_dir, &dir.path().join("job"));
    let job_env = local_etcd_env(&docs, job_container, &ports, &job_mounts);
    let args: Vec<String> = job_container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| relocate(&scalar(a), &job_mounts))
        .collect();
    let run_job = || {
        let spec = telemetry_harness::ProcessSpec::new(
            telemetry_harness::workspace_bin_dir().join("telemetry-admin"),
        )
        .args(args.clone())
        .env(job_env.clone());
        async move {
            tokio::task::spawn_blocking(move || spec.run_within(std::time::Duration::from_secs(60)))
                .await
                .expect("joins")
                .expect("telemetry-admin runs")
        }
    };
    let first = run_job().await;
    assert!(first.status.success(), "the Job failed: {first:?}\n{}", logs());
    assert!(
        first.stdout.contains("authentication: enabled now"),
        "{}",
        first.stdout
    );
    let again = run_job().await;
    assert!(again.status.success(), "the Job failed when run again: {again:?}");
    assert!(
        again.stdout.contains("authentication: enabled\n"),
        "{}",
        again.stdout
    );
    assert!(
        !again.stdout.contains(" created ") && !again.stdout.contains(" granted "),
        "a second run changed something:\n{}",
        again.stdout
    );

    // Each pipeline pod's environment connects as its own user, reads what its role allows and
    // is refused a write outside it; the pipeline's certificate alone (no user) gets nothing.
    let namespace = config_maps(&docs)["telemetry-common"]["ETCD_NAMESPACE"].clone();
    let keys = telemetry_shared::Keyspace::new(&namespace);
    for (service, workload) in pipeline_workloads(&docs) {
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let mounts = local_mounts(pod, container, &secrets_dir, &dir.path().join(&service));
        let env = local_etcd_env(&docs, container, &ports, &mounts);
        let config = common_config(env.clone());
        assert_eq!(
            config.etcd_user.as_ref().map(|u| u.name.clone()),
            Some(service_user(&docs, &service))
        );
        let mut client = telemetry_shared::etcd::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{service} cannot connect as its user: {e}\n{}", logs()));
        let role = telemetry_shared::access::Service::from_name(&service).expect("a service");
        let readable = telemetry_shared::access::grants(role, &keys)
            .into_iter()
            .find(|g| g.access.reads())
            .expect("a readable prefix");
        client
            .get(
                readable.prefix.clone(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap_or_else(|e| panic!("{service} reading {}: {e}", readable.prefix));
        let denied = client
            .put(format!("{namespace}/not-granted"), "x", None)
            .await
            .expect_err("a write outside the role");
        assert!(
            denied.to_string().contains("permission denied"),
            "{service}: {denied}"
        );
        let anonymous: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k != "ETCD_USERNAME" && k != "ETCD_PASSWORD_FILE")
            .collect();
        let refused = match telemetry_shared::etcd::connect(&common_config(anonymous)).await {
            Ok(mut client) => client.get(readable.prefix.clone(), None).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "{service}: the pipeline certificate alone read etcd");
    }

    // One cluster of three, peers on https, and a write through one member is read through
    // another (replicated over the peers' TLS), as root by the Job's certificate.
    let member = |i: usize| {
        let env: Vec<(String, String)> = job_env
            .iter()
            .map(|(k, v)| {
                let v = if k == "ETCD_ENDPOINTS" {
                    format!("https://127.0.0.1:{}", ports[i][0])
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        common_config(env)
    };
    let mut client = telemetry_shared::etcd::connect(&member(0))
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
    let clients: Vec<String> = list
        .members()
        .iter()
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    assert!(clients.iter().all(|u| u.starts_with("https://")), "{clients:?}");
    client.put("deploy-test", "over-tls", None).await.expect("put");
    let mut other = telemetry_shared::etcd::connect(&member(2))
        .await
        .expect("connect");
    let got = other.get("deploy-test", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"over-tls");
    drop(members);
}
