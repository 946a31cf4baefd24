//! Every failure the API answers with, as a status and a JSON body
//! `{"error": <code>, "message": <text>, …}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use factline_core::{ExpectedVersion, StoreError};
use serde_json::{json, Value};

/// What an admin operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No projection (or parked event) by that name.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be carried out as it stands (a rebuild already
    /// running, a projection this server has no code for).
    #[error("{0}")]
    Refused(String),
    /// The operation failed (the database, a task), with the error that
    /// made it fail.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl AdminError {
    /// The operation failed because of `error`.
    pub fn failed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        AdminError::Failed(error.into())
    }
}

/// `error` and what caused it, outermost first: `a: b: c`.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        // Many errors repeat their source's words; say each once.
        if !text.ends_with(&said) {
            text = format!("{text}: {said}");
        }
        cause = e.source();
    }
    text
}

/// An API failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    /// 400: the request is malformed.
    BadRequest(String),
    #[error("{0}")]
    /// 401: no token, or an unknown one.
    Unauthorized(String),
    #[error("{0}")]
    /// 403: the token may not do this, or the browser policy refused it.
    Forbidden(String),
    #[error("{0}")]
    /// 404: no such route, projection or parked event.
    NotFound(String),
    #[error("{0}")]
    /// 413: the body or an event is over its limit.
    TooLarge(String),
    #[error("{0}")]
    /// 409: the request cannot be carried out as it stands.
    Refused(String),
    /// A retried event id does not match what is stored (the store's
    /// refusal, worded for the caller's scope).
    #[error("{0}")]
    IdempotencyMismatch(String),
    /// An idempotency key of another command.
    #[error("{0}")]
    KeyReused(String),
    /// The body is not in a format this route takes.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The caller holds as much of something as one caller may.
    #[error("{0}")]
    TooMany(String),
    #[error(transparent)]
    /// The store's answer, mapped to its status.
    Store(#[from] StoreError),
    #[error("{0}")]
    /// 500: something failed inside the server.
    Internal(String),
    #[error("{0}")]
    /// 503: the server cannot answer now (shutting down, a dependency down).
    Unavailable(String),
    /// 504: a read model did not reach the position a read asked for
    /// (`min_position`) within its timeout.
    #[error(
        "read model {read_model} has reached position {position}, not {wanted}, within the timeout"
    )]
    NotCaughtUp {
        /// The read model.
        read_model: String,
        /// Where it is.
        position: u64,
        /// Where the read wanted it.
        wanted: u64,
    },
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotFound(m) => ApiError::NotFound(m),
            AdminError::Refused(m) => ApiError::Refused(m),
            AdminError::Failed(e) => ApiError::Internal(with_causes(e.as_ref())),
        }
    }
}

impl ApiError {
    /// 400 with this message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Refused(_) => (StatusCode::CONFLICT, "refused"),
            ApiError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many"),
            ApiError::IdempotencyMismatch(_) => (StatusCode::CONFLICT, "idempotency_mismatch"),
            ApiError::KeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NotCaughtUp { .. } => (StatusCode::GATEWAY_TIMEOUT, "not_caught_up"),
            ApiError::Store(e) => match e {
                StoreError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
                StoreError::IdempotencyMismatch { .. } => {
                    (StatusCode::CONFLICT, "idempotency_mismatch")
                }
                StoreError::CommandKeyReused { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
                }
                StoreError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                StoreError::InvalidStreamId(_) | StoreError::InvalidInput(_) => {
                    (StatusCode::BAD_REQUEST, "invalid_request")
                }
                StoreError::InlineRefused { .. } => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "inline_projection_refused",
                ),
                StoreError::Storage(s) if s.is_retryable() => {
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                }
                StoreError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
                // A kind of failure this server does not know yet.
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            },
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    /// The JSON body: `error` is a stable code, `message` is for people.
    pub fn body(&self) -> Value {
        let (_, code) = self.status_and_code();
        let mut body = json!({ "error": code, "message": self.to_string() });
        if let ApiError::Store(StoreError::Conflict {
            stream_id,
            expected,
            actual,
        }) = self
        {
            body["stream_id"] = json!(stream_id);
            body["expected"] = expected_json(*expected);
            body["actual"] = json!(actual);
        }
        if let ApiError::NotCaughtUp {
            position, wanted, ..
        } = self
        {
            body["position"] = json!(position);
            body["wanted"] = json!(wanted);
        }
        body
    }
}

fn expected_json(expected: ExpectedVersion) -> Value {
    serde_json::to_value(expected).unwrap_or(Value::Null)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            // Operators watch for probing: refusals show at the default
            // level, with the request's span (method, path), never a token.
            tracing::info!(status = status.as_u16(), reason = %self, "request refused");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Gives every error answer a JSON body `{"error", "message"}`, including
/// those the framework writes by itself (a path that does not decode, 405,
/// a timeout), so clients parse one shape. Other headers (`Allow`,
/// `WWW-Authenticate`) stay.
pub(crate) async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let code = match status.as_u16() {
        400 => "invalid_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        413 => "too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        431 => "headers_too_large",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "error",
    };
    let mut answer = (status, Json(json!({ "error": code, "message": message }))).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the registry")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_failed_admin_operation_answers_500_with_every_cause() {
        let failed = AdminError::failed(Outer(std::io::Error::other("disk gone")));
        assert!(
            std::error::Error::source(&failed).is_some(),
            "keeps its source"
        );
        let answer = ApiError::from(failed);
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.body()["message"], "reading the registry: disk gone");
    }
}
