//! The OpenAPI 3.1 document, served at `/openapi.json` (and drawn at `/docs`).
//!
//! Most of it is generated from the handlers' `#[utoipa::path]` attributes, the parameter
//! rules of [`crate::params`] and the response types. Two modifiers add what those cannot see:
//! - [`Payloads`]: the payload versions' JSON Schemas (the files served at `/schemas/`) as
//!   components, and the telemetry page per media type (`application/vnd.telemetry.<v>+json`),
//!   so a page's items are described as exactly as the records themselves;
//! - [`EveryRoute`]: what the router adds around every route: 405 for another method (the
//!   method fallback) and 500 when a handler fails (the panic layer), each with [`ErrorBody`];
//! - [`Secured`], only when `GATEWAY_API_TOKENS_FILE` is set: the `bearer` security scheme (and
//!   `websocketProtocol`, the token as a WebSocket subprotocol), required by every `/api/v1/`
//!   operation, which may then answer 401 (with `WWW-Authenticate`) and 429 (with
//!   `Retry-After`). Without tokens the server never gives either, and the document says so
//!   by not listing them.
//!
//! A path the router does not know answers 404 with [`ErrorBody`] (stated in the description,
//! as it belongs to no operation). The integration test `openapi` walks this document, sends
//! the requests it allows and those just outside it, and checks every answer against it.

use telemetry_shared::SchemaVersion;
use utoipa::{
    Modify, OpenApi,
    openapi::{
        AllOfBuilder, ArrayBuilder, ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr,
        ResponseBuilder, Type,
        schema::Schema,
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

use crate::{
    error::ErrorBody,
    frames::{CloseReason, ErrorFrame, HelloFrame, TelemetryFrame, payload_component, version_suffix},
    hub::Filter,
    negotiate::media_type,
    query::Order,
    rest, store, ws,
};

/// The OpenAPI 3.1 description of the gateway, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "GPU telemetry gateway",
        description = "Read GPU telemetry stored in etcd by the collectors: REST pages and a live \
                       WebSocket feed, with schema-versioned payloads (v1, v1beta2, v1beta1). \
                       Every error is JSON (`ErrorBody`); a path not listed here answers 404, \
                       another method on a listed path 405."
    ),
    paths(
        rest::health,
        crate::probes::livez,
        crate::probes::readyz,
        rest::list_gpus,
        rest::fleet_latest,
        rest::gpu_telemetry,
        rest::stats,
        rest::schema_file,
        ws::ws_telemetry
    ),
    components(schemas(
        ErrorBody,
        crate::probes::ProbeReport,
        crate::probes::ProbeCheck,
        crate::probes::ProbeStatus,
        rest::Health,
        rest::LiveStatus,
        rest::WindowStatus,
        store::EtcdHealth,
        rest::GpuView,
        rest::GpuList,
        rest::TelemetryPage,
        crate::fleet::FleetLatest,
        crate::fleet::GpuLatest,
        crate::fleet::LatestValue,
        store::Stats,
        Order,
        Filter,
        HelloFrame,
        TelemetryFrame,
        ErrorFrame,
        CloseReason
    )),
    modifiers(&Payloads, &EveryRoute),
    tags(
        (name = "telemetry", description = "Stored telemetry"),
        (name = "live", description = "Live telemetry over WebSocket"),
        (name = "health", description = "Liveness and readiness"),
        (name = "schemas", description = "JSON Schemas of the payload versions")
    )
)]
pub struct ApiDoc;

/// The operation whose 200 response is a page of payloads.
const TELEMETRY_PATH: &str = "/api/v1/gpus/{id}/telemetry";

/// Adds the payload versions' schemas and describes the telemetry page per media type.
struct Payloads;

impl Modify for Payloads {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut content = Vec::new();
        for version in SchemaVersion::ALL {
            if let Some(schema) = payload_schema(version) {
                components.schemas.insert(payload_component(version), schema);
            }
            let page = page_component(version);
            components
                .schemas
                .insert(page.clone(), page_schema(version).into());
            content.push((
                media_type(version),
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(page)))
                    .build(),
            ));
        }
        let ok = doc
            .paths
            .paths
            .get_mut(TELEMETRY_PATH)
            .and_then(|item| item.get.as_mut())
            .and_then(|op| op.responses.responses.get_mut("200"));
        if let Some(RefOr::T(response)) = ok {
            response.content = content.into_iter().collect();
        }
    }
}

fn page_component(version: SchemaVersion) -> String {
    format!("TelemetryPage{}", version_suffix(version))
}

/// A telemetry page whose items are payloads of `version`.
fn page_schema(version: SchemaVersion) -> Schema {
    let narrowed = ObjectBuilder::new()
        .property(
            "schema_version",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([version.as_str()])),
        )
        .property(
            "items",
            ArrayBuilder::new().items(Ref::from_schema_name(payload_component(version))),
        );
    AllOfBuilder::new()
        .item(Ref::from_schema_name("TelemetryPage"))
        .item(narrowed)
        .description(Some(format!(
            "A telemetry page of {} payloads.",
            version.as_str()
        )))
        .into()
}

/// The JSON Schema served at `/schemas/{version}.json`, as a component. Two rewrites make it
/// fit the document's schema model without changing what it accepts: `const: "x"` becomes
/// `type: string, enum: ["x"]` (every `const` there is a string), and `propertyNames` says
/// `type: string` (property names always are). `$schema` and `$id` belong to the file.
fn payload_schema(version: SchemaVersion) -> Option<RefOr<Schema>> {
    let mut value: serde_json::Value = serde_json::from_str(version.json_schema()).ok()?;
    let root = value.as_object_mut()?;
    root.remove("$schema");
    root.remove("$id");
    fit(&mut value);
    serde_json::from_value(value).ok()
}

fn fit(value: &mut serde_json::Value) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    if let Some(constant) = object.remove("const") {
        object.insert("type".into(), "string".into());
        object.insert("enum".into(), serde_json::json!([constant]));
    }
    if let Some(names) = object.get_mut("propertyNames").and_then(|n| n.as_object_mut()) {
        names.insert("type".into(), "string".into());
    }
    for (_, child) in object.iter_mut() {
        fit(child);
    }
}

/// The document as `/openapi.json` serves it; `secured` when the API needs tokens
/// (`GATEWAY_API_TOKENS_FILE`). utoipa 5.5 writes a link's fields in snake case
/// (`operation_id`); OpenAPI spells them `operationId`, `operationRef` and `requestBody`.
pub fn document(secured: bool) -> serde_json::Value {
    let mut api = ApiDoc::openapi();
    if secured {
        Secured.modify(&mut api);
    }
    let mut doc = serde_json::to_value(api).unwrap_or_default();
    let responses = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op["responses"].as_object_mut())
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let links = response["links"]
            .as_object_mut()
            .into_iter()
            .flat_map(|l| l.values_mut());
        for link in links.filter_map(|l| l.as_object_mut()) {
            for (snake, camel) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(value) = link.remove(snake) {
                    link.insert(camel.into(), value);
                }
            }
        }
    }
    doc
}

/// The operations that need a token when tokens are configured.
const PROTECTED_PREFIX: &str = "/api/v1/";

/// The WebSocket operation, which also takes the token as a subprotocol.
const WS_PATH: &str = "/api/v1/ws/telemetry";

/// With tokens: the security schemes, each protected operation's requirement, and its 401
/// and 429 answers.
struct Secured;

impl Modify for Secured {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from the gateway's GATEWAY_API_TOKENS_FILE: `Authorization: \
                         Bearer <token>`. Each token may make GATEWAY_TOKEN_RATE requests per \
                         second (bursts of GATEWAY_TOKEN_BURST) and hold \
                         GATEWAY_TOKEN_MAX_SUBSCRIPTIONS WebSocket subscriptions; past either, 429.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "websocketProtocol",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Sec-WebSocket-Protocol",
                "For browsers, whose WebSocket cannot set headers: offer the subprotocols \
                 `telemetry` and `bearer.<token>` (`new WebSocket(url, [\"telemetry\", \
                 \"bearer.\" + token])`); the server selects `telemetry`.",
            ))),
        );
        let error = |description: &str, header: (&str, &str, Type)| {
            let (name, about, kind) = header;
            ResponseBuilder::new()
                .description(description)
                .header(
                    name,
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(kind))
                        .description(Some(about))
                        .build(),
                )
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with(PROTECTED_PREFIX) {
                continue;
            }
            let Some(op) = item.get.as_mut() else {
                continue;
            };
            let mut security = vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
            if path == WS_PATH {
                security.push(SecurityRequirement::new(
                    "websocketProtocol",
                    Vec::<String>::new(),
                ));
            }
            op.security = Some(security);
            let responses = &mut op.responses.responses;
            responses.insert(
                "401".into(),
                error(
                    "No token (`unauthorized`) or one this gateway does not accept \
                     (`invalid_token`); nothing was read",
                    (
                        "WWW-Authenticate",
                        "`Bearer realm=\"telemetry\"` (with `error=\"invalid_token\"` for a wrong token)",
                        Type::String,
                    ),
                )
                .into(),
            );
            let limits = if path == WS_PATH {
                "The token's request rate (`rate_limited`) or its WebSocket subscriptions \
                 (`too_many_subscriptions`) are used up"
            } else {
                "The token's request rate is used up (`rate_limited`)"
            };
            responses.insert(
                "429".into(),
                error(
                    limits,
                    (
                        "Retry-After",
                        "Seconds to wait before retrying (at least 1).",
                        Type::Integer,
                    ),
                )
                .into(),
            );
        }
    }
}

/// Adds the responses every route can give: 405 and 500.
struct EveryRoute;

impl Modify for EveryRoute {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let responses = &mut op.responses.responses;
                responses
                    .entry("405".into())
                    .or_insert_with(|| error("Only GET (and HEAD) is allowed on this path").into());
                responses
                    .entry("500".into())
                    .or_insert_with(|| error("The gateway failed on this request (it is logged)").into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames;

    fn doc() -> serde_json::Value {
        document(false)
    }

    /// A compiled schema with the document's components, for `$ref`s into them.
    fn validator(doc: &serde_json::Value, schema: serde_json::Value) -> jsonschema::Validator {
        let root = serde_json::json!({ "components": doc["components"], "allOf": [schema] });
        jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .expect("compiles")
    }

    #[test]
    fn payload_components_accept_exactly_what_the_schema_files_accept() {
        let doc = doc();
        for version in SchemaVersion::ALL {
            let name = payload_component(version);
            let mut component = doc["components"]["schemas"][&name].clone();
            fit(&mut component);
            let mut file: serde_json::Value = serde_json::from_str(version.json_schema()).expect("file");
            let root = file.as_object_mut().expect("object");
            root.remove("$schema");
            root.remove("$id");
            fit(&mut file);
            assert_eq!(component, file, "{name} lost something in the conversion");
        }
    }

    #[test]
    fn frames_validate_against_their_components() {
        let doc = doc();
        let message = telemetry_shared::Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::from_parts(1, 2),
            timestamp: telemetry_shared::Timestamp::now(),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields: [("metric_name".to_string(), serde_json::json!("M"))]
                .into_iter()
                .collect(),
        };
        let check = |name: &str, frame: serde_json::Value| {
            let schema = serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
            let errors: Vec<String> = validator(&doc, schema)
                .iter_errors(&frame)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{name}: {frame}: {errors:?}");
        };
        for version in SchemaVersion::ALL {
            let payload = message.to_version(version).to_string();
            let text = frames::telemetry_frame(7, &[&payload, &payload]);
            check(
                "TelemetryFrame",
                serde_json::from_str(&text).expect("a telemetry frame is JSON"),
            );
        }
        let hello = HelloFrame {
            r#type: frames::HelloType::Hello,
            revision: 5,
            since_revision: None,
            schema_version: "v1beta2",
            filter: Filter {
                metric: Some("M".into()),
                ..Filter::default()
            },
        };
        check("HelloFrame", serde_json::json!(hello));
        let error = ErrorFrame {
            r#type: frames::ErrorType::Error,
            error: CloseReason::Compacted,
            detail: "gone".into(),
            last_revision: 4,
        };
        check("ErrorFrame", serde_json::json!(error));
        let built = TelemetryFrame {
            r#type: frames::TelemetryType::Telemetry,
            revision: 1,
            records: vec![],
        };
        let schema = serde_json::json!({ "$ref": "#/components/schemas/TelemetryFrame" });
        assert!(
            !validator(&doc, schema).is_valid(&serde_json::json!(built)),
            "a telemetry frame has at least one record"
        );
    }

    /// Each declared parameter is a field of the struct that receives it, and each field is
    /// declared (the parameter lists are written by hand beside the rules they declare).
    fn declared_params_are_the_fields<T>()
    where
        T: utoipa::IntoParams + serde::de::DeserializeOwned + std::fmt::Debug + Default,
    {
        let params = T::into_params(|| None);
        let empty = format!("{:?}", T::default());
        let fields = empty.matches(": None").count() + empty.matches(": \"\"").count();
        assert_eq!(params.len(), fields, "{empty}");
        for p in params {
            let set: T =
                serde_json::from_value(serde_json::json!({ p.name.clone(): "x" })).expect("deserializes");
            assert_ne!(format!("{set:?}"), empty, "{} is not a field", p.name);
        }
    }

    #[test]
    fn parameters_are_declared_for_every_field() {
        declared_params_are_the_fields::<crate::query::RawTelemetryQuery>();
        declared_params_are_the_fields::<ws::WsParams>();
        declared_params_are_the_fields::<rest::GpusParams>();
        declared_params_are_the_fields::<rest::TelemetryPath>();
        declared_params_are_the_fields::<rest::SchemaPath>();
    }

    #[test]
    fn every_operation_lists_405_and_500_and_the_page_is_per_version() {
        let doc = doc();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            let responses = &item["get"]["responses"];
            for status in ["405", "500"] {
                assert!(responses[status].is_object(), "{path} lacks {status}");
            }
        }
        let content = doc["paths"][TELEMETRY_PATH]["get"]["responses"]["200"]["content"]
            .as_object()
            .expect("content");
        let types: Vec<&String> = content.keys().collect();
        assert_eq!(types.len(), 3, "{types:?}");
        assert!(content.contains_key("application/vnd.telemetry.v1beta1+json"));
        let next = &doc["paths"][TELEMETRY_PATH]["get"]["responses"]["200"]["links"]["next"];
        assert_eq!(next["operationId"], "gpu_telemetry", "{next}");
        assert!(next.get("operation_id").is_none());
    }

    #[test]
    fn tokens_add_security_401_and_429_to_the_api_only() {
        let open = document(false);
        assert!(open["components"]["securitySchemes"].is_null());
        let secured = document(true);
        let schemes = &secured["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
        assert_eq!(schemes["websocketProtocol"]["name"], "Sec-WebSocket-Protocol");
        for (path, item) in secured["paths"].as_object().expect("paths") {
            let op = &item["get"];
            let protected = path.starts_with(PROTECTED_PREFIX);
            assert_eq!(op["security"].is_array(), protected, "{path}");
            assert_eq!(op["responses"]["401"].is_object(), protected, "{path}");
            assert_eq!(op["responses"]["429"].is_object(), protected, "{path}");
            assert!(open["paths"][path]["get"]["security"].is_null(), "{path}");
            if protected {
                let retry = &op["responses"]["429"]["headers"]["Retry-After"];
                assert_eq!(retry["schema"]["type"], "integer", "{path}");
            }
        }
        assert_eq!(
            secured["paths"][WS_PATH]["get"]["security"],
            serde_json::json!([{"bearer": []}, {"websocketProtocol": []}])
        );
        for probe in ["/livez", "/readyz", "/health"] {
            assert!(secured["paths"][probe]["get"].is_object(), "{probe}");
        }
    }
}
