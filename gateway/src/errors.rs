//! Errors and their HTTP form, in one place.
//!
//! Handlers return [`ApiError`]; it converts into [`ErrorResponse`], whose variants document
//! every error status in the OpenAPI spec. Errors raised outside handlers (a body that is not
//! JSON, an unknown route, a missing token) are turned into the same JSON shape by
//! [`into_json_response`], which the router installs as its catch-all. Every error body is
//! `{"code": "...", "message": "...", "field": "..."}`; `code` is stable, `message` is for people.

use poem::{IntoResponse, Response, http::StatusCode};
use poem_openapi::{ApiResponse, Object, payload::Json};

/// The body of every error answer.
#[derive(Debug, Clone, Object, serde::Deserialize, PartialEq)]
#[oai(rename = "Error", skip_serializing_if_is_none)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_field`, `unauthorized`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The offending request field or header, when there is one (`recipient.webhook_url`).
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
    /// On a `503` from sending: the id the notification has if it was stored. Retry with it as
    /// the `Idempotency-Key` (when the request had none) and the retry converges on it.
    #[oai(skip_serializing_if_is_none)]
    #[serde(default)]
    pub notification_id: Option<String>,
}

/// Every error answer the API gives.
#[derive(Debug, ApiResponse)]
pub enum ErrorResponse {
    /// The request is malformed: not JSON, a field of the wrong type, a missing field.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The bearer token is missing, forged, malformed or expired.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The token is valid but lacks the scope this operation needs.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such resource (or not visible to this tenant).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The `Idempotency-Key` was used by an earlier request with a different body
    /// (`idempotency_key_reused`), a write conflicts with another (`conflict`), or a dead letter
    /// cannot be replayed (`not_replayable`).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// A write's `If-Match` names a revision the resource is no longer (or not) at; nothing was
    /// changed. Read it again, apply the change, and retry with the new `ETag`.
    #[oai(status = 412)]
    PreconditionFailed(Json<ErrorBody>),
    /// The body did not arrive within `HERALD_BODY_READ_TIMEOUT`.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The body is larger than `HERALD_MAX_BODY_BYTES`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body is not `application/json` (raised before the handler runs; listed for clients).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// Well-formed, but a value cannot be used (unsupported channel, bad URL, past expiry).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The tenant or the token sends faster than `HERALD_TENANT_RATE` / `HERALD_TOKEN_RATE`
    /// allow (`rate_limited`); nothing was stored. Retry after `Retry-After` seconds.
    #[oai(status = 429)]
    TooManyRequests(
        Json<ErrorBody>,
        #[oai(header = "Retry-After")] u32,
        /// Sends allowed in a burst (one second's worth).
        #[oai(header = "RateLimit-Limit")]
        u64,
        /// Sends left in the burst now.
        #[oai(header = "RateLimit-Remaining")]
        u64,
        /// Seconds until this request would fit.
        #[oai(header = "RateLimit-Reset")]
        u32,
    ),
    /// NATS is unreachable or too slow (`unavailable`), Herald's storage is full
    /// (`storage_full`), or the gateway handles as many requests as it may (`overloaded`). The notification may or may not have been stored: retry with the same
    /// `Idempotency-Key`, which makes the retry safe.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

/// What can go wrong in a handler.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Malformed { field: Option<String>, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("this token lacks the scope `{0}`")]
    MissingScope(&'static str),
    /// The token may not touch this resource (a user's token, another user's inbox).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    StorageFull(String),
    /// A dead letter that cannot be replayed (undecodable, expired, only partly kept).
    #[error("{0}")]
    NotReplayable(String),
    /// `If-Match` does not match the resource's current revision.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// Over the tenant's or the token's rate.
    #[error("this {} sends faster than its limit allows; retry in {}s", .0.which, .0.retry_after.as_secs_f64().ceil())]
    RateLimited(crate::limits::Limited),
    /// More requests at once than `HERALD_MAX_IN_FLIGHT`.
    #[error("the gateway is handling as many requests as it may (HERALD_MAX_IN_FLIGHT); retry in a second")]
    Overloaded,
    /// An `Idempotency-Key` reused with a different request.
    #[error("{0}")]
    KeyReused(String),
    /// Sending failed for want of NATS or room (`cause`) after the notification got its id:
    /// the answer carries the id, so a retry can use it as its key.
    #[error("{cause}; retry with the Idempotency-Key you sent, or with {id} if you sent none")]
    NotStored { id: String, cause: Box<ApiError> },
}

impl From<herald_shared::users::UserError> for ApiError {
    fn from(e: herald_shared::users::UserError) -> ApiError {
        use herald_shared::users::UserError;
        match e {
            UserError::NotFound(_) => ApiError::NotFound(e.to_string()),
            UserError::Stale { .. } | UserError::Missing(_) => ApiError::PreconditionFailed(e.to_string()),
            UserError::Invalid(i) => ApiError::invalid(i.field, i.message),
            UserError::Contended(_) => ApiError::Conflict(e.to_string()),
            UserError::Full => ApiError::StorageFull(e.to_string()),
            UserError::Nats(_) | UserError::Corrupt(..) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<herald_shared::template_store::StoreError> for ApiError {
    fn from(e: herald_shared::template_store::StoreError) -> ApiError {
        use herald_shared::template_store::StoreError;
        match e {
            StoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::Stale(_) => ApiError::PreconditionFailed(e.to_string()),
            StoreError::Nats(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<herald_shared::templates::TemplateProblem> for ApiError {
    fn from(e: herald_shared::templates::TemplateProblem) -> ApiError {
        ApiError::Malformed { field: Some(format!("parts.{}", e.part)), message: e.to_string() }
    }
}

impl From<herald_shared::templates::RenderProblem> for ApiError {
    fn from(e: herald_shared::templates::RenderProblem) -> ApiError {
        let field = if e.part == "data" { "data".to_owned() } else { format!("parts.{}", e.part) };
        ApiError::Invalid { field, message: e.to_string() }
    }
}

impl From<herald_shared::dlq::DlqError> for ApiError {
    fn from(e: herald_shared::dlq::DlqError) -> ApiError {
        use herald_shared::dlq::DlqError;
        match e {
            DlqError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DlqError::NotReplayable(..) => ApiError::NotReplayable(e.to_string()),
            DlqError::Invalid(m) => ApiError::Malformed { field: None, message: m },
            DlqError::Nats(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<herald_shared::state::StateError> for ApiError {
    fn from(e: herald_shared::state::StateError) -> ApiError {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<herald_shared::inbox::InboxError> for ApiError {
    fn from(e: herald_shared::inbox::InboxError) -> ApiError {
        use herald_shared::inbox::InboxError;
        match e {
            InboxError::NotFound(_) => ApiError::NotFound(e.to_string()),
            InboxError::Store(ref m) if herald_shared::topology::is_storage_full(m) => {
                ApiError::StorageFull(e.to_string())
            }
            InboxError::Store(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }

    pub fn malformed(field: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError::Malformed { field, message: message.into() }
    }

    /// The stable code, also the `reason` label of the rejection metric.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed { .. } => "malformed_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::MissingScope(_) | ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Invalid { .. } => "invalid_field",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::StorageFull(_) => "storage_full",
            ApiError::NotReplayable(_) => "not_replayable",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::KeyReused(_) => "idempotency_key_reused",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::NotStored { cause, .. } => cause.code(),
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            ApiError::Malformed { field, .. } => field.clone(),
            ApiError::Invalid { field, .. } => Some(field.clone()),
            _ => None,
        }
    }
}

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> ErrorResponse {
        let notification_id = match &e {
            ApiError::NotStored { id, .. } => Some(id.clone()),
            _ => None,
        };
        let body = Json(ErrorBody {
            code: e.code().to_owned(),
            message: e.to_string(),
            field: e.field(),
            notification_id,
        });
        let e = match e {
            ApiError::NotStored { cause, .. } => *cause,
            e => e,
        };
        match e {
            ApiError::Malformed { .. } => ErrorResponse::BadRequest(body),
            ApiError::Unauthorized(_) => ErrorResponse::Unauthorized(body),
            ApiError::MissingScope(_) | ApiError::Forbidden(_) => ErrorResponse::Forbidden(body),
            ApiError::NotFound(_) => ErrorResponse::NotFound(body),
            ApiError::Conflict(_) => ErrorResponse::Conflict(body),
            ApiError::TooLarge(_) => ErrorResponse::PayloadTooLarge(body),
            ApiError::Invalid { .. } => ErrorResponse::Unprocessable(body),
            ApiError::Unavailable(_) => ErrorResponse::Unavailable(body, 1),
            ApiError::StorageFull(_) => ErrorResponse::Unavailable(body, 30),
            ApiError::NotReplayable(_) => ErrorResponse::Conflict(body),
            ApiError::PreconditionFailed(_) => ErrorResponse::PreconditionFailed(body),
            ApiError::KeyReused(_) => ErrorResponse::Conflict(body),
            ApiError::RequestTimeout(_) => ErrorResponse::RequestTimeout(body),
            ApiError::Overloaded => ErrorResponse::Unavailable(body, 1),
            ApiError::RateLimited(l) => {
                let wait = l.retry_after.as_secs_f64().ceil().max(1.0) as u32;
                ErrorResponse::TooManyRequests(body, wait, l.limit, l.remaining, wait)
            }
            ApiError::NotStored { .. } => unreachable!("unwrapped above"),
        }
    }
}

impl ApiError {
    /// The status and body this error answers with: what a batch reports per notification.
    pub fn parts(self) -> (StatusCode, ErrorBody) {
        match ErrorResponse::from(self) {
            ErrorResponse::BadRequest(b) => (StatusCode::BAD_REQUEST, b.0),
            ErrorResponse::Unauthorized(b) => (StatusCode::UNAUTHORIZED, b.0),
            ErrorResponse::Forbidden(b) => (StatusCode::FORBIDDEN, b.0),
            ErrorResponse::NotFound(b) => (StatusCode::NOT_FOUND, b.0),
            ErrorResponse::Conflict(b) => (StatusCode::CONFLICT, b.0),
            ErrorResponse::PreconditionFailed(b) => (StatusCode::PRECONDITION_FAILED, b.0),
            ErrorResponse::PayloadTooLarge(b) => (StatusCode::PAYLOAD_TOO_LARGE, b.0),
            ErrorResponse::RequestTimeout(b) => (StatusCode::REQUEST_TIMEOUT, b.0),
            ErrorResponse::UnsupportedMediaType(b) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, b.0),
            ErrorResponse::Unprocessable(b) => (StatusCode::UNPROCESSABLE_ENTITY, b.0),
            ErrorResponse::Unavailable(b, _) => (StatusCode::SERVICE_UNAVAILABLE, b.0),
            ErrorResponse::TooManyRequests(b, ..) => (StatusCode::TOO_MANY_REQUESTS, b.0),
        }
    }
}

impl From<ApiError> for poem::Error {
    fn from(e: ApiError) -> poem::Error {
        ErrorResponse::from(e).into()
    }
}

/// Turns any error that reached the router into the JSON error shape. Errors that already are
/// JSON answers (built from [`ErrorResponse`]) pass through untouched.
pub fn into_json_response(err: poem::Error) -> Response {
    let status = err.status();
    if !err.has_source() {
        let response = err.into_response();
        let is_json = response
            .headers()
            .get(poem::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        if is_json {
            return response;
        }
        return json_error(
            status,
            code_for(status),
            status.canonical_reason().unwrap_or("error").to_lowercase(),
            None,
        );
    }
    let message = err.to_string();
    let field = if status == StatusCode::BAD_REQUEST { field_in_message(&message) } else { None };
    let message = match status {
        StatusCode::UNAUTHORIZED => "a bearer token is required (Authorization: Bearer <JWT>)".to_owned(),
        _ => message,
    };
    json_error(status, code_for(status), message, field)
}

fn json_error(status: StatusCode, code: &str, message: String, field: Option<String>) -> Response {
    let body = ErrorBody { code: code.to_owned(), message, field, notification_id: None };
    let mut response = Json(body).into_response();
    response.set_status(status);
    response
}

/// The code of an error that was not raised as an [`ApiError`].
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "malformed_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PRECONDITION_FAILED => "precondition_failed",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_field",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// poem's parameter errors say "failed to parse parameter `x`": keep `x` as the field.
fn field_in_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}
