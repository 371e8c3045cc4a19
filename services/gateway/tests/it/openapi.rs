//! The OpenAPI document tells the truth, checked from the document itself rather than from a
//! list kept here: the test fetches `/openapi.json` from a gateway serving the DCGM sample,
//! reads every operation's parameters and responses, generates requests from the parameter
//! schemas, sends them, and checks each answer against the document:
//! - its status is one the operation lists;
//! - a request inside every declared constraint never gets a 400 or a 406;
//! - a request with one value just outside a declared constraint gets a 4xx;
//! - its content type is one listed for that status, and a JSON body validates against the
//!   schema listed for it (`$ref`s resolved into `components`).
//!
//! Values to try come from each schema: its enum, default and examples, bounds and the
//! numbers either side of them, lengths at and past `minLength`/`maxLength`, a set of
//! `date-time` forms, and a few generic strings (empty, blank, plain). The schema itself
//! says which of them are inside it. A parameter that a response link fills from a response
//! body (a GPU's `id`, a page's `cursor`) takes values the server issued: the walk takes them
//! from the links it follows, and other values inside its schema may be refused (with a listed
//! 4xx, as its description says).

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Path,
    Query,
    Header,
}

#[derive(Debug, Clone)]
struct Param {
    name: String,
    at: In,
    required: bool,
    schema: Value,
    /// The parameter's own `example`, if any.
    example: Option<Value>,
}

#[derive(Debug, Clone)]
struct Operation {
    id: String,
    path: String,
    params: Vec<Param>,
    responses: Value,
    /// The operation lists a security requirement: it needs a token.
    secured: bool,
}

/// A link from one operation's response to another operation.
#[derive(Debug, Clone)]
struct Link {
    target: String,
    /// Parameter name → runtime expression (or a literal value).
    parameters: BTreeMap<String, Value>,
}

/// What a request is expected to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Inside every declared constraint: never 400 or 406.
    Allowed,
    /// Inside the schema of a parameter whose values the server issues: any listed status.
    Unissued,
    /// Just outside a declared constraint: a 4xx.
    Refused,
}

/// Parameter values of one request, as text.
type Values = BTreeMap<String, String>;

const DATE_TIMES: [&str; 14] = [
    "2026-01-01T00:00:00Z",
    "2026-01-01t00:00:00z",
    "2024-02-29T23:59:59.999999999+23:59",
    "0000-01-01T00:00:00-00:00",
    "9999-12-31T23:59:59-23:59",
    "2025-07-18T20:42:34.5+02:00",
    "2026-01-01 00:00:00Z",
    "2026-12-31T23:59:60Z",
    "2026-02-29T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T00:60:00Z",
    "2026-01-01T00:00:00",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01",
];

const PLAIN_STRINGS: [&str; 8] = ["", " ", "\t", "a", " a ", "zz-not-listed", "Ab0_-", "GPU-0"];

struct Doc {
    json: Value,
}

impl Doc {
    /// A schema with the document's components beside it, so `$ref`s resolve.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let root = json!({ "components": self.json["components"], "allOf": [schema] });
        jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    /// Follows a `$ref` into `components`.
    fn deref<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
            Some(pointer) => self.json.pointer(pointer).map_or(value, |v| self.deref(v)),
            None => value,
        }
    }

    fn operations(&self) -> Vec<Operation> {
        let mut ops = Vec::new();
        for (path, item) in self.json["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                assert_eq!(method, "get", "{path}: only GET operations are expected");
                let params = op["parameters"]
                    .as_array()
                    .map(|ps| ps.iter().map(|p| self.param(p)).collect())
                    .unwrap_or_default();
                ops.push(Operation {
                    id: op["operationId"].as_str().expect("operationId").to_string(),
                    path: path.clone(),
                    params,
                    responses: op["responses"].clone(),
                    secured: op["security"].as_array().is_some_and(|s| !s.is_empty()),
                });
            }
        }
        // Link sources before their targets (a GPU's telemetry needs an id from the list).
        let links = self.links();
        ops.sort_by_key(|op| {
            links
                .iter()
                .filter(|(from, l)| l.target == op.id && *from != op.id)
                .count()
        });
        ops
    }

    fn param(&self, p: &Value) -> Param {
        let p = self.deref(p);
        let at = match p["in"].as_str() {
            Some("path") => In::Path,
            Some("query") => In::Query,
            Some("header") => In::Header,
            other => panic!("unexpected parameter location {other:?}"),
        };
        Param {
            name: p["name"].as_str().expect("name").to_string(),
            at,
            required: p["required"].as_bool().unwrap_or(false),
            schema: self.deref(&p["schema"]).clone(),
            example: p.get("example").cloned(),
        }
    }

    /// Every response link: (source operation id, link).
    fn links(&self) -> Vec<(String, Link)> {
        let mut out = Vec::new();
        for item in self.json["paths"].as_object().expect("paths").values() {
            let op = &item["get"];
            let source = op["operationId"].as_str().unwrap_or_default().to_string();
            for response in op["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    let parameters = link["parameters"]
                        .as_object()
                        .map(|p| p.clone().into_iter().collect())
                        .unwrap_or_default();
                    out.push((
                        source.clone(),
                        Link {
                            target: link["operationId"].as_str().expect("operationId").to_string(),
                            parameters,
                        },
                    ));
                }
            }
        }
        out
    }

    /// Parameters of `op` that a link fills from a response body: the server issues their
    /// values.
    fn issued(&self, op: &Operation) -> BTreeSet<String> {
        self.links()
            .into_iter()
            .filter(|(_, l)| l.target == op.id)
            .flat_map(|(_, l)| l.parameters.into_iter())
            .filter(|(_, e)| e.as_str().is_some_and(|e| e.starts_with("$response.body")))
            .map(|(name, _)| name)
            .collect()
    }
}

/// Values worth trying for a parameter, from its schema.
fn candidates(param: &Param) -> Vec<Value> {
    let s = &param.schema;
    let mut out: Vec<Value> = param.example.iter().cloned().collect();
    out.extend(s.get("default").cloned());
    for list in ["examples", "enum"] {
        out.extend(s[list].as_array().into_iter().flatten().cloned());
    }
    if s["type"] == "integer" {
        for bound in ["minimum", "maximum"] {
            if let Some(n) = s[bound].as_i64() {
                out.push(json!(n));
                // Just outside and just inside the bound; past i64 it is a longer number.
                out.push(
                    n.checked_sub(1)
                        .map_or_else(|| json!(format!("-{n}0")), |m| json!(m)),
                );
                out.push(
                    n.checked_add(1)
                        .map_or_else(|| json!(format!("{n}0")), |m| json!(m)),
                );
            }
        }
        out.extend([json!("x"), json!(""), json!(1.5)]);
    } else {
        out.extend(PLAIN_STRINGS.map(|t| json!(t)));
        if let Some(n) = s["minLength"].as_u64() {
            out.push(json!("a".repeat(n as usize)));
            if n > 0 {
                out.push(json!("a".repeat(n as usize - 1)));
            }
        }
        if let Some(n) = s["maxLength"].as_u64() {
            out.push(json!("a".repeat(n as usize)));
            out.push(json!("a".repeat(n as usize + 1)));
        }
        if s["format"] == "date-time" {
            out.extend(DATE_TIMES.map(|t| json!(t)));
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|v| seen.insert(v.to_string()));
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes a path segment.
fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What came back.
struct Answer {
    status: u16,
    content_type: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

/// Which token a request presents to an operation that needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    /// The walk's token (if the gateway has tokens).
    Valid,
    /// None at all.
    Missing,
    /// One the gateway does not know.
    Wrong,
}

struct Walk {
    doc: Doc,
    http: reqwest::Client,
    base: String,
    /// Parameter sets links produced, by target operation id.
    linked: BTreeMap<String, Vec<Values>>,
    requests: usize,
    /// The token the walk presents to operations that need one (`None`: the gateway has no
    /// tokens).
    token: Option<String>,
}

impl Walk {
    async fn send(
        &mut self,
        op: &Operation,
        values: &Values,
        method: Method,
        accept: Option<&str>,
    ) -> Answer {
        self.send_as(op, values, method, accept, Credentials::Valid).await
    }

    async fn send_as(
        &mut self,
        op: &Operation,
        values: &Values,
        method: Method,
        accept: Option<&str>,
        credentials: Credentials,
    ) -> Answer {
        self.requests += 1;
        let mut path = op.path.clone();
        let mut query = Vec::new();
        let mut headers = Vec::new();
        for p in &op.params {
            let value = values.get(&p.name);
            match (p.at, value) {
                (In::Path, v) => {
                    path = path.replace(&format!("{{{}}}", p.name), &segment(v.map_or("", String::as_str)));
                }
                (In::Query, Some(v)) => query.push((p.name.clone(), v.clone())),
                (In::Header, Some(v)) => headers.push((p.name.clone(), v.clone())),
                (_, None) => {}
            }
        }
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(&query);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        match (op.secured, credentials, &self.token) {
            (true, Credentials::Valid, Some(token)) => request = request.bearer_auth(token),
            (true, Credentials::Wrong, _) => request = request.bearer_auth("tok-nobody-has-this-one-0000"),
            _ => {}
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let headers = response.headers().clone();
        // A 101 hands the connection over; there is no body to read.
        let body = if status == 101 {
            String::new()
        } else {
            response.text().await.expect("body")
        };
        Answer {
            status,
            content_type,
            headers,
            body,
        }
    }

    /// Checks an answer against the operation's responses; records the links it yields.
    fn check(&mut self, op: &Operation, values: &Values, answer: &Answer, expect: Expect) {
        let what = format!("GET {} {values:?} ({expect:?})", op.path);
        let status = answer.status.to_string();
        let documented = &op.responses[&status];
        assert!(
            documented.is_object(),
            "{what}: status {status} is not listed: {}",
            answer.body
        );
        match expect {
            Expect::Allowed => assert!(
                !matches!(answer.status, 400 | 406),
                "{what}: allowed by the document, refused: {}",
                answer.body
            ),
            Expect::Refused => assert!(
                (400..500).contains(&answer.status),
                "{what}: outside the document, got {status}: {}",
                answer.body
            ),
            Expect::Unissued => assert!(answer.status < 500, "{what}: {status}"),
        }
        // The headers the document lists for this answer are there.
        for name in documented["headers"]
            .as_object()
            .into_iter()
            .flat_map(|h| h.keys())
        {
            assert!(
                answer.headers.contains_key(name.as_str()),
                "{what}: {status} without its documented header {name}"
            );
        }
        let Some(content) = documented["content"].as_object().filter(|c| !c.is_empty()) else {
            assert!(
                answer.body.is_empty(),
                "{what}: undocumented body {}",
                answer.body
            );
            return;
        };
        let media = answer.content_type.clone().unwrap_or_default();
        let Some(listed) = content.get(&media) else {
            panic!("{what}: content type {media:?} is not listed for {status}");
        };
        let body: Value = serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("{what}: {media} body is not JSON ({e}): {}", answer.body));
        let errors: Vec<String> = self
            .doc
            .validator(&listed["schema"])
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{what}: body outside its schema: {errors:?}");
        self.follow_links(documented, values, &body);
    }

    /// Evaluates a response's links (`$request.*` and `$response.body#…`) into parameter sets.
    fn follow_links(&mut self, documented: &Value, request: &Values, body: &Value) {
        for link in documented["links"]
            .as_object()
            .into_iter()
            .flat_map(|l| l.values())
        {
            let target = link["operationId"].as_str().unwrap_or_default().to_string();
            let mut values = Values::new();
            let mut complete = true;
            for (name, expression) in link["parameters"].as_object().into_iter().flatten() {
                let expression = expression.as_str().unwrap_or_default();
                let value = if let Some(pointer) = expression.strip_prefix("$response.body#") {
                    body.pointer(pointer).filter(|v| !v.is_null()).map(text)
                } else if let Some(name) = expression
                    .strip_prefix("$request.path.")
                    .or_else(|| expression.strip_prefix("$request.query."))
                {
                    request.get(name).cloned()
                } else {
                    Some(expression.to_string())
                };
                match value {
                    Some(v) => {
                        values.insert(name.clone(), v);
                    }
                    None if expression.starts_with("$response") => complete = false,
                    None => {}
                }
            }
            let sets = self.linked.entry(target).or_default();
            if complete && !sets.contains(&values) && sets.len() < 20 {
                sets.push(values);
            }
        }
    }

    /// A request inside the document: linked values if a link gave some, otherwise each
    /// required parameter's first value inside its schema.
    fn baseline(&self, op: &Operation) -> Values {
        if let Some(values) = self.linked.get(&op.id).and_then(|sets| sets.first()) {
            return values.clone();
        }
        let mut values = Values::new();
        for p in op.params.iter().filter(|p| p.required) {
            let validator = self.doc.validator(&p.schema);
            let value = candidates(p)
                .into_iter()
                .find(|v| validator.is_valid(v))
                .unwrap_or_else(|| panic!("{}: no value inside the schema of {}", op.path, p.name));
            values.insert(p.name.clone(), text(&value));
        }
        values
    }

    async fn walk(&mut self, op: &Operation) {
        let issued = self.doc.issued(op);
        let base = self.baseline(op);
        let answer = self.send(op, &base, Method::GET, None).await;
        self.check(op, &base, &answer, Expect::Allowed);
        // An operation that needs a token: without one, or with a wrong one, a 401.
        if op.secured && self.token.is_some() {
            for credentials in [Credentials::Missing, Credentials::Wrong] {
                let answer = self.send_as(op, &base, Method::GET, None, credentials).await;
                assert_eq!(answer.status, 401, "{} {credentials:?}: {}", op.path, answer.body);
                self.check(op, &base, &answer, Expect::Refused);
            }
        }
        for p in &op.params {
            let validator = self.doc.validator(&p.schema);
            for candidate in candidates(p) {
                let mut values = base.clone();
                values.insert(p.name.clone(), text(&candidate));
                let expect = match (validator.is_valid(&candidate), issued.contains(&p.name)) {
                    (false, _) => Expect::Refused,
                    (true, true) => Expect::Unissued,
                    (true, false) => Expect::Allowed,
                };
                let answer = self.send(op, &values, Method::GET, None).await;
                self.check(op, &values, &answer, expect);
            }
            if p.required && p.at != In::Path {
                let mut values = base.clone();
                values.remove(&p.name);
                let answer = self.send(op, &values, Method::GET, None).await;
                self.check(op, &values, &answer, Expect::Refused);
            }
        }
        // Every parameter set a link gave (a cursor's next page, say) is allowed.
        for values in self.linked.get(&op.id).cloned().unwrap_or_default() {
            let answer = self.send(op, &values, Method::GET, None).await;
            self.check(op, &values, &answer, Expect::Allowed);
        }
        self.negotiation(op, &base).await;
        // Another method on the path.
        let answer = self.send(op, &base, Method::POST, None).await;
        assert_eq!(answer.status, 405, "POST {}", op.path);
        self.check(op, &base, &answer, Expect::Refused);
    }

    /// Asking for each media type a success lists gets that media type.
    async fn negotiation(&mut self, op: &Operation, base: &Values) {
        let mut media_types = Vec::new();
        for (status, response) in op.responses.as_object().expect("responses") {
            if status.starts_with('2') {
                media_types.extend(
                    response["content"]
                        .as_object()
                        .into_iter()
                        .flat_map(|c| c.keys().cloned()),
                );
            }
        }
        for media in media_types {
            let answer = self.send(op, base, Method::GET, Some(&media)).await;
            self.check(op, base, &answer, Expect::Allowed);
            assert_eq!(
                answer.content_type.as_deref(),
                Some(media.as_str()),
                "{} as {media}: {} {}",
                op.path,
                answer.status,
                answer.body
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_the_document_allows_is_served_as_it_says() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    // Without tokens, then with: the document changes with the configuration (security, 401,
    // 429) and each gateway must match its own.
    walk_gateway(&server, &client, None).await;
    walk_gateway(&server, &client, Some("tok-openapi-walk-0123456789")).await;
}

async fn walk_gateway(
    server: &telemetry_harness::EtcdServer,
    client: &etcd_client::Client,
    token: Option<&str>,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, token.unwrap_or_default()).expect("tokens file");
    let tokens = tokens.display().to_string();
    let extra: Vec<(&str, &str)> = match token {
        // Unlimited, so that the walk's hundreds of requests are not refused for their rate.
        Some(_) => vec![
            ("GATEWAY_API_TOKENS_FILE", tokens.as_str()),
            ("GATEWAY_TOKEN_RATE", "0"),
            ("GATEWAY_TOKEN_MAX_SUBSCRIPTIONS", "0"),
        ],
        None => Vec::new(),
    };
    let gw = spawn_gateway(server, client, &extra).await;
    let http = reqwest::Client::new();
    let (status, json) = get(&http, &format!("{}/openapi.json", gw.base)).await;
    assert_eq!(status, 200);
    let doc = Doc { json };
    let ops = doc.operations();
    assert!(ops.len() >= 6, "{ops:?}");
    assert_eq!(
        ops.iter().any(|op| op.secured),
        token.is_some(),
        "the document declares security exactly when tokens are configured"
    );
    let mut walk = Walk {
        doc,
        http,
        base: gw.base.clone(),
        linked: BTreeMap::new(),
        requests: 0,
        token: token.map(str::to_string),
    };
    for op in &ops {
        walk.walk(op).await;
    }
    // Links were followed: a GPU's telemetry from the list, and a next page from a page.
    let telemetry = walk.linked.get("gpu_telemetry").map_or(0, Vec::len);
    assert!(telemetry >= 2, "links gave {telemetry} parameter sets");
    // A path outside the document answers 404 with the document's error body.
    let answer = walk
        .send(
            &Operation {
                id: "none".into(),
                path: "/api/v1/nothing".into(),
                params: Vec::new(),
                responses: json!({}),
                secured: false,
            },
            &Values::new(),
            Method::GET,
            None,
        )
        .await;
    assert_eq!(answer.status, 404);
    let body: Value = serde_json::from_str(&answer.body).expect("JSON 404");
    let error_body = json!({ "$ref": "#/components/schemas/ErrorBody" });
    assert!(walk.doc.validator(&error_body).is_valid(&body), "{body}");
    assert!(walk.requests > 150, "only {} requests", walk.requests);
    gw.shutdown().await;
}

/// The WebSocket frames validate against their components in the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_match_their_components() {
    let (server, client) = etcd().await;
    load_sample(&server, &client).await;
    let gw = spawn_gateway(&server, &client, &[]).await;
    let http = reqwest::Client::new();
    let (_, json) = get(&http, &format!("{}/openapi.json", gw.base)).await;
    let doc = Doc { json };
    let frame = |name: &str| doc.validator(&json!({ "$ref": format!("#/components/schemas/{name}") }));
    let (hello, telemetry, error) = (frame("HelloFrame"), frame("TelemetryFrame"), frame("ErrorFrame"));
    for version in ["v1", "v1beta2", "v1beta1"] {
        let url = format!(
            "{}/api/v1/ws/telemetry?since_revision=0&schema={version}&hostname=mtv5-dgx1-hgpu-031",
            gw.ws
        );
        let (mut socket, first) = connect(&url).await;
        assert!(hello.is_valid(&first), "{first}");
        let Frame::Json(records) = next(&mut socket).await else {
            panic!("closed")
        };
        let errors: Vec<String> = telemetry.iter_errors(&records).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{version}: {errors:?}");
    }
    let (mut socket, _) = connect(&format!("{}/api/v1/ws/telemetry", gw.ws)).await;
    gw.stop.cancel();
    match next(&mut socket).await {
        Frame::Json(notice) => {
            let errors: Vec<String> = error.iter_errors(&notice).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{notice}: {errors:?}");
        }
        Frame::Closed(close) => panic!("closed without an error frame: {close:?}"),
    }
    drop(server);
}
