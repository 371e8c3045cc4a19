//! The dashboard in a real headless Chromium against a running pipeline: it shows every GPU of
//! the sample, a value on the page changes when new telemetry arrives, and the GPU page draws
//! its charts. A screenshot is kept under the target directory (never in the repository).
//!
//! Chromium is Debian's `chromium` (`scripts/test` installs it); `CHROMIUM_BIN` overrides.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

use crate::helpers::*;

const UUID: &str = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50";
const UTIL: &str = "DCGM_FI_DEV_GPU_UTIL";

fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM_BIN") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("no Chromium found: install Debian's chromium (scripts/test does) or set CHROMIUM_BIN");
}

/// A headless Chromium driven over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(chromium_binary())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1400,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it chose into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some(port) = text.lines().next().and_then(|l| l.trim().parse::<u16>().ok())
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .expect("DevTools answers")
            .json()
            .await
            .expect("target list");
        let url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (page, _) = connect_async(url).await.expect("DevTools socket");
        Browser {
            child,
            _profile: profile,
            page,
            next_id: 0,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::Text(request.to_string().into()))
            .await
            .expect("send to DevTools");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .expect("DevTools answers within 30 s")
                .expect("DevTools socket open")
                .expect("DevTools frame");
            if let Message::Text(text) = msg {
                let value: Value = serde_json::from_str(&text).expect("JSON");
                if value["id"] == id {
                    assert!(value["error"].is_null(), "{method}: {value}");
                    return value["result"].clone();
                }
            }
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until `ok` accepts its value.
    async fn wait_for(&mut self, expression: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.eval(expression).await;
            if ok(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: last value {value}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().expect("image data"))
            .expect("base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_gpu_and_updates_live() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let stop_collector = spawn_collector(&server, &client);
    let gw = spawn_gateway(&server, &client, &[]).await;
    let mut browser = Browser::launch().await;

    browser.goto(&format!("{}/", gw.base)).await;
    browser
        .wait_for(
            "document.querySelectorAll('.gpu').length",
            |v| v == 247,
            "247 GPU cards",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('section.host').length")
            .await,
        31
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#gpu-count').textContent.trim()")
            .await,
        "247"
    );
    let span = format!(
        "document.querySelector('.gpu[data-uuid=\"{UUID}\"] .value[data-metric=\"{UTIL}\"]').textContent.trim()"
    );
    // The sample's first row: this GPU at 0 % utilization.
    browser
        .wait_for(&span, |v| v == "0", "the stored utilization")
        .await;
    browser
        .wait_for(
            "document.querySelector('#total-records').textContent.replace(/[^0-9]/g, '')",
            |v| v == "2470",
            "the stats header",
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#live-status').textContent.trim()",
            |v| v == "live",
            "live status",
        )
        .await;

    // New telemetry for that GPU arrives through the real streamer and collector.
    let dir = tempfile::tempdir().expect("dir");
    let sample = std::fs::read_to_string(sample_csv()).expect("sample");
    let mut lines = sample.lines();
    let header = lines.next().expect("header");
    let first = lines.next().expect("first row");
    let updated = first.replacen(",\"0\",\"DCGM_FI_DRIVER", ",\"77\",\"DCGM_FI_DRIVER", 1);
    assert_ne!(updated, first, "the sample's first row changed shape");
    let csv = dir.path().join("live.csv");
    std::fs::write(&csv, format!("{header}\n{updated}\n")).expect("write csv");
    assert_eq!(stream_csv(&server, &client, &csv, "live").await, 1);
    browser.wait_for(&span, |v| v == "77", "the live update").await;
    assert!(
        browser
            .eval("window.dashboard.updates")
            .await
            .as_u64()
            .unwrap_or(0)
            >= 1
    );

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    browser.screenshot(&shots.join("dashboard.png")).await;

    // The GPU page draws one chart per metric from history.
    browser.goto(&format!("{}/gpu?uuid={UUID}", gw.base)).await;
    browser
        .wait_for(
            "document.querySelectorAll('.chart canvas').length",
            |v| v.as_u64().unwrap_or(0) >= 4,
            "four charts",
        )
        .await;
    browser
        .wait_for(
            &format!("document.querySelector('.latest[data-metric=\"{UTIL}\"]').textContent.trim()"),
            |v| v == "77",
            "the GPU page's latest value",
        )
        .await;
    browser.screenshot(&shots.join("dashboard-gpu.png")).await;
    eprintln!("screenshots in {}", shots.display());
    stop_collector.cancel();
    gw.shutdown().await;
}

/// With tokens configured, the dashboard asks for one when the API answers 401, keeps it for
/// the tab, and then loads over REST and goes live over the WebSocket (the token as a
/// subprotocol).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_a_token_and_uses_it() {
    const TOKEN: &str = "tok-dashboard-0123456789abcdef";
    let (server, client) = etcd().await;
    let csv = csv_file(&[(UTIL, "0", UUID, "host-a", "")]);
    load_csv(&server, &client, csv.path(), 1).await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
    let tokens = tokens.display().to_string();
    let gw = spawn_gateway(&server, &client, &[("GATEWAY_API_TOKENS_FILE", tokens.as_str())]).await;
    let mut browser = Browser::launch().await;

    browser.goto(&format!("{}/", gw.base)).await;
    browser
        .wait_for(
            "!!document.querySelector('#token-form')",
            |v| v == true,
            "the token form after a 401",
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('#token-input').value = '{TOKEN}'; \
             document.querySelector('#token-form').requestSubmit(); true"
        ))
        .await;
    browser
        .wait_for(
            "document.querySelectorAll('.gpu').length",
            |v| v == 1,
            "the GPU card, read with the token",
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#live-status').textContent.trim()",
            |v| v == "live",
            "live over the WebSocket with the token",
        )
        .await;
    assert_eq!(
        browser.eval("!!document.querySelector('#token-form')").await,
        false
    );
    assert_eq!(
        browser.eval("sessionStorage.getItem('telemetry.apiToken')").await,
        TOKEN
    );
    gw.shutdown().await;
}
