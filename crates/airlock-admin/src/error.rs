//! Admin API errors: one enum, one mapping to status and code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An admin API error. Messages never hold secrets.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    Conflict(String),
    Internal(String),
    /// The session store is out of reach (see
    /// [`airlock_store::StoreError::is_unavailable`]): 503, worth retrying.
    StoreUnavailable(String),
    /// Any other refusal, by its status: what axum refused before a handler
    /// ran (a method a route does not have, a body over the limit, a path
    /// that is not UTF-8).
    Status(StatusCode, String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, &str) {
        match self {
            Self::BadRequest(m) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
                m,
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "unauthorized",
                "a valid admin token is required (Authorization: Bearer ...)",
            ),
            Self::NotFound(m) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                m,
            ),
            Self::Conflict(m) => (StatusCode::CONFLICT, "invalid_request_error", "conflict", m),
            Self::Internal(m) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal",
                m,
            ),
            Self::StoreUnavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "store_unavailable",
                m,
            ),
            Self::Status(status, m) => {
                let code = match *status {
                    StatusCode::BAD_REQUEST => "bad_request",
                    StatusCode::NOT_FOUND => "not_found",
                    StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
                    StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    s if s.is_server_error() => "internal",
                    _ => "bad_request",
                };
                let error_type = if status.is_server_error() {
                    "api_error"
                } else {
                    "invalid_request_error"
                };
                (*status, error_type, code, m)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type, code, message) = self.parts();
        if status.is_server_error() {
            tracing::error!(%message, "admin request failed");
        }
        let body = serde_json::json!({
            "error": { "type": error_type, "code": code, "message": message }
        });
        (status, Json(body)).into_response()
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    /// A query string the route's parameters refuse, said without axum's
    /// own wording around the reason (`Failed to deserialize query
    /// string: …`).
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        let text = e.body_text();
        let reason = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text);
        Self::BadRequest(format!("invalid query string: {reason}"))
    }
}

impl From<airlock_session::RegistryError> for ApiError {
    fn from(e: airlock_session::RegistryError) -> Self {
        match e {
            airlock_session::RegistryError::Store(e) => e.into(),
            // In force here, and written to the store once it can be.
            airlock_session::RegistryError::RevocationPending(ref inner)
                if inner.is_unavailable() =>
            {
                Self::StoreUnavailable(e.to_string())
            }
            pending @ airlock_session::RegistryError::RevocationPending(_) => {
                Self::Internal(pending.to_string())
            }
        }
    }
}

impl From<airlock_store::StoreError> for ApiError {
    fn from(e: airlock_store::StoreError) -> Self {
        if e.is_unavailable() {
            Self::StoreUnavailable(format!("the session store is out of reach: {e}"))
        } else {
            Self::Internal(e.to_string())
        }
    }
}
