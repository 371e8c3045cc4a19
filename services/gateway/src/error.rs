//! The one error type of every HTTP response that is not a success: a status and a JSON body
//! `{"error": code, "detail": text}`, so clients can branch on `error` and show `detail`.

use axum::{
    Json,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use telemetry_shared::{SchemaVersion, etcd::EtcdError};
use utoipa::ToSchema;

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `invalid_parameter` or `not_found`.
    pub error: String,
    /// What went wrong, for a person.
    pub detail: String,
}

/// An HTTP error with its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The status code.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
    /// Headers the status calls for (`WWW-Authenticate` with a 401, `Retry-After` with a 429).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with the given status, code and detail.
    pub fn new(status: StatusCode, error: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_string(),
                detail: detail.into(),
            },
            headers: Vec::new(),
        }
    }

    /// The same error with header `name: value` added.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 400 `invalid_parameter`, naming the parameter.
    pub fn invalid(param: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("{param}: {detail}"),
        )
    }

    /// 404 `not_found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 406 `unsupported_schema_version`, listing the supported versions.
    pub fn unsupported_version(asked: &str) -> Self {
        let supported: Vec<&str> = SchemaVersion::ALL.iter().map(|v| v.as_str()).collect();
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            "unsupported_schema_version",
            format!(
                "schema version {asked:?} is not supported; supported: {} (ask with ?schema= or \
                 Accept: application/vnd.telemetry.<version>+json)",
                supported.join(", ")
            ),
        )
    }

    /// 503 `etcd_unavailable`: the store could not answer.
    pub fn unavailable(err: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "etcd_unavailable",
            format!("the telemetry store did not answer: {err}"),
        )
    }
}

impl From<EtcdError> for ApiError {
    fn from(err: EtcdError) -> Self {
        tracing::warn!(error = %err, "etcd request failed");
        ApiError::unavailable(err)
    }
}

/// The error of a read at an explicit revision that etcd refused because of that revision: one
/// it has compacted away (410) or not reached yet (400). `None` for any other failure.
pub(crate) fn revision_refused(err: &EtcdError) -> Option<ApiError> {
    let EtcdError::Client(etcd_client::Error::GRpcStatus(status)) = err else {
        return None;
    };
    let message = status.message();
    if message.contains("required revision has been compacted") {
        Some(ApiError::new(
            StatusCode::GONE,
            "compacted",
            "etcd has compacted that revision away; read without `revision` (or a newer one)",
        ))
    } else if message.contains("required revision is a future revision") {
        Some(ApiError::invalid(
            "revision",
            "etcd has not reached that revision yet",
        ))
    } else {
        None
    }
}

impl From<etcd_client::Error> for ApiError {
    fn from(err: etcd_client::Error) -> Self {
        ApiError::from(EtcdError::from(err))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.body.error,
            self.body.detail
        )
    }
}
