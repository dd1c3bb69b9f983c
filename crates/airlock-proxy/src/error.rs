//! Why a call was refused, and the JSON error an SDK can parse.
//!
//! Every refusal is a [`Denial`]; [`Denial::status`] and [`Denial::code`] are
//! the one place that maps a reason to an HTTP status and an error code.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;

/// The `code` field of airlock's error bodies. Also the `decision` recorded
/// for a refused call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AuditUnavailable,
    BadRequest,
    CredentialUnavailable,
    InvalidToken,
    OutOfScope,
    RateLimited,
    StoreUnavailable,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
    PayloadTooLarge,
    HeadersTooLarge,
    Overloaded,
    ShuttingDown,
    UriTooLong,
}

/// A refused or failed call. The message is shown to the caller and must
/// never hold a token or credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    code: ErrorCode,
    message: String,
    /// Seconds after which the call may succeed (`Retry-After`).
    retry_after: Option<u64>,
    /// Retrying cannot help (`x-should-retry: false`).
    final_answer: bool,
    /// The agent's connection went away: nobody reads this answer, and the
    /// call is recorded and counted as `client_aborted`.
    agent_gone: bool,
    /// A bound on capacity, not a sign of misuse: a 429 counted toward no
    /// `max_denied`.
    capacity: bool,
}

/// The first error of type `T` in `error`'s chain, `error` itself
/// included: what caused a failure that others wrapped (hyper around the
/// socket's `io::Error`, the client around airlock's own body errors).
pub(crate) fn cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

// === impl ErrorCode ===

impl ErrorCode {
    /// All codes, in a fixed order (used to pre-register metrics).
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::AuditUnavailable,
        ErrorCode::BadRequest,
        ErrorCode::CredentialUnavailable,
        ErrorCode::InvalidToken,
        ErrorCode::OutOfScope,
        ErrorCode::RateLimited,
        ErrorCode::StoreUnavailable,
        ErrorCode::UpstreamAuthFailed,
        ErrorCode::UpstreamError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::HeadersTooLarge,
        ErrorCode::Overloaded,
        ErrorCode::ShuttingDown,
        ErrorCode::UriTooLong,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuditUnavailable => "audit_unavailable",
            Self::BadRequest => "bad_request",
            Self::CredentialUnavailable => "credential_unavailable",
            Self::InvalidToken => "invalid_token",
            Self::OutOfScope => "out_of_scope",
            Self::RateLimited => "rate_limited",
            Self::StoreUnavailable => "store_unavailable",
            Self::UpstreamAuthFailed => "upstream_auth_failed",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::UriTooLong => "uri_too_long",
        }
    }

    /// The HTTP status for this code.
    pub fn status(self) -> StatusCode {
        match self {
            Self::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::CredentialUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidToken => StatusCode::UNAUTHORIZED,
            Self::OutOfScope => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamAuthFailed => StatusCode::BAD_GATEWAY,
            Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    /// The `type` field, in the vocabulary the OpenAI and Anthropic SDKs use.
    pub(crate) fn error_type(self) -> &'static str {
        match self {
            Self::BadRequest | Self::PayloadTooLarge | Self::HeadersTooLarge | Self::UriTooLong => {
                "invalid_request_error"
            }
            Self::InvalidToken => "authentication_error",
            Self::OutOfScope => "permission_error",
            Self::RateLimited => "rate_limit_error",
            Self::AuditUnavailable
            | Self::CredentialUnavailable
            | Self::Overloaded
            | Self::ShuttingDown
            | Self::StoreUnavailable
            | Self::UpstreamAuthFailed
            | Self::UpstreamError
            | Self::UpstreamTimeout => "api_error",
        }
    }

    /// Index into [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Denial ===

impl Denial {
    /// A denial with a message for the caller.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            final_answer: false,
            agent_gone: false,
            capacity: false,
        }
    }

    /// The same denial as a bound on capacity rather than misuse: it counts
    /// toward no `max_denied` (see [`Denial::counts_as_denial`]).
    pub fn capacity(mut self) -> Self {
        self.capacity = true;
        self
    }

    /// Whether this refusal counts toward the session's `max_denied` and
    /// `calls.denied`: a 429 that is not a bound on capacity.
    pub fn counts_as_denial(&self) -> bool {
        self.code == ErrorCode::RateLimited && !self.capacity
    }

    /// The same denial, for a call whose agent went away before it could
    /// be answered.
    pub fn agent_gone(mut self) -> Self {
        self.agent_gone = true;
        self
    }

    /// Whether the agent went away ([`Denial::agent_gone`]).
    pub fn is_agent_gone(&self) -> bool {
        self.agent_gone
    }

    /// The same denial with `x-should-retry: false`: the OpenAI and
    /// Anthropic SDKs otherwise retry a 429 or a 5xx by themselves, and
    /// every retry of a call that cannot succeed is one more denial toward
    /// `max_denied`.
    pub fn no_retry(mut self) -> Self {
        self.final_answer = true;
        self
    }

    /// The same denial with `Retry-After: wait` (whole seconds, rounded up,
    /// at least one), which SDKs honour before retrying a 429.
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The message shown to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON error response.
    /// The response carries its [`ErrorCode`] as an extension.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = error_response(
            self.status(),
            self.code.error_type(),
            self.code.as_str(),
            &self.message,
        );
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.final_answer {
            response.headers_mut().insert(
                http::HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        response.extensions_mut().insert(self.code);
        response
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Builds `{"error":{"type":..,"code":..,"message":..}}` with the given status.
pub fn error_response(
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "type": error_type, "code": code, "message": message }
    });
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `index` is the declaration order, which metrics rely on matching
    /// `ALL`'s; and every code has a distinct wire name.
    #[test]
    fn every_code_is_at_its_index_in_all() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i, "{code}");
        }
        let names: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
