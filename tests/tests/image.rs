//! The container image of `scripts/image`, built for real and run without a container runtime.
//!
//! The test builds the image with podman (`CONTAINER_ENGINE` overrides) from the debug binaries
//! this test run built (`--bin-dir target/<profile>`: a release build would take most of the
//! suite's time; `scripts/image` itself builds release for users), exports its file system
//! (`podman create` + `podman export`: podman cannot start containers on every machine, this
//! one included) and runs each of the five binaries' `--version` inside it with `chroot`, as the
//! image's user 10001. So the image holds every binary and every library they load, and nothing
//! needs a registry. As root `chroot --userspec=10001:10001` does it; without root,
//! `unshare -r chroot` (a user namespace) does, as that namespace's root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BINARIES: [&str; 5] = [
    "telemetry-streamer",
    "telemetry-collector",
    "telemetry-gateway",
    "telemetry-exporter",
    "telemetry-admin",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin_dir() -> PathBuf {
    // This test runs from target/<profile>/deps/; the service binaries are in target/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The image and the container made from it, removed when dropped.
struct Built {
    engine: String,
    tag: String,
    container: Option<String>,
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(id) = &self.container {
            let _ = Command::new(&self.engine).args(["rm", "-f", id]).output();
        }
        let _ = Command::new(&self.engine).args(["rmi", "-f", &self.tag]).output();
    }
}

/// How to run a command inside `fs` as a non-root user, or why this machine cannot.
fn chroot_prefix(fs: &Path) -> Result<Vec<String>, String> {
    let fs = fs.display().to_string();
    let candidates: Vec<Vec<String>> = if ok(Command::new("id").arg("-u")) == "0" {
        vec![vec!["chroot".into(), "--userspec=10001:10001".into(), fs]]
    } else {
        vec![vec!["unshare".into(), "-r".into(), "chroot".into(), fs]]
    };
    let mut errors = Vec::new();
    for prefix in candidates {
        let out = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["/usr/local/bin/telemetry-admin", "--version"])
            .output();
        match out {
            Ok(out) if out.status.success() => return Ok(prefix),
            Ok(out) => errors.push(format!(
                "{prefix:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => errors.push(format!("{prefix:?}: {e}")),
        }
    }
    Err(errors.join("; "))
}

#[test]
fn the_image_holds_every_binary_and_what_it_links() {
    let engine = std::env::var("CONTAINER_ENGINE").unwrap_or_else(|_| "podman".into());
    let bins = bin_dir();
    for bin in BINARIES {
        assert!(
            bins.join(bin).exists(),
            "{} is missing: build the services first (cargo build --bins, or run the whole \
             workspace with cargo nextest run --workspace)",
            bins.join(bin).display()
        );
    }
    let info = Command::new(&engine).arg("info").output();
    match info {
        Err(e) => panic!("cannot run {engine} (scripts/test installs Debian's podman): {e}"),
        Ok(out) if !out.status.success() => {
            // Installed but unusable here (no storage driver in this sandbox, say).
            println!(
                "SKIPPED: {engine} cannot build images on this machine: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Ok(_) => {}
    }

    let tag = format!("localhost/gpu-telemetry-test:{}", std::process::id());
    let mut built = Built {
        engine: engine.clone(),
        tag: tag.clone(),
        container: None,
    };
    let printed = ok(Command::new(root().join("scripts/image"))
        .args(["--tag", &tag, "--bin-dir"])
        .arg(&bins)
        .env("CONTAINER_ENGINE", &engine));
    assert_eq!(printed, tag, "scripts/image prints the tag it built");

    let config = ok(Command::new(&engine).args([
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Cmd}}",
        &tag,
    ]));
    assert_eq!(config, "10001:10001|[\"telemetry-gateway\"]", "user and command");

    // Its file system, unpacked.
    let id = ok(Command::new(&engine).args(["create", &tag]));
    built.container = Some(id.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    let tar = dir.path().join("image.tar");
    ok(Command::new(&engine).args(["export", "-o"]).arg(&tar).arg(&id));
    let fs = dir.path().join("fs");
    std::fs::create_dir(&fs).expect("mkdir");
    ok(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&fs));

    // Nothing but the binaries, their libraries and the few files a user needs: no shell.
    assert!(!fs.join("bin/sh").exists(), "the image has a shell");
    let passwd = std::fs::read_to_string(fs.join("etc/passwd")).expect("/etc/passwd");
    assert!(passwd.contains(":10001:10001:"), "{passwd}");
    assert_eq!(
        std::fs::read(fs.join("data/dcgm_sample.csv")).expect("/data/dcgm_sample.csv"),
        std::fs::read(root().join("data/dcgm_sample.csv")).expect("sample"),
    );

    let prefix = match chroot_prefix(&fs) {
        Ok(prefix) => prefix,
        Err(why) => {
            println!("SKIPPED: chroot cannot run on this machine: {why}");
            return;
        }
    };
    for bin in BINARIES {
        let path = format!("/usr/local/bin/{bin}");
        let version = ok(Command::new(&prefix[0])
            .args(&prefix[1..])
            .args([path.as_str(), "--version"]));
        assert_eq!(
            version,
            format!("{bin} {}", env!("CARGO_PKG_VERSION")),
            "{bin} --version inside the image ({prefix:?})"
        );
    }
    println!("{tag}: five binaries run inside the image with {prefix:?}");
}
