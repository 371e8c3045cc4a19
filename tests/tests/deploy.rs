//! The deploy files and the binaries agree: every environment variable that
//! `deploy/compose.yaml` or `deploy/k8s/*.yaml` sets for one of our binaries is a variable that
//! binary reads (derived from its config struct, not from a list kept by hand), and the values
//! set there make a valid configuration.

use std::{collections::BTreeMap, path::PathBuf};

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

#[test]
fn kubernetes_manifests_set_only_variables_the_binaries_read() {
    let dir = root().join("deploy/k8s");
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
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
    for package in ["streamer", "collector", "gateway", "exporter", "admin"] {
        let manifest =
            std::fs::read_to_string(root().join(format!("services/{package}/Cargo.toml"))).expect("manifest");
        assert!(manifest.contains(&format!("name = \"telemetry-{package}\"")));
    }
}
