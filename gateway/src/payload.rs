//! `StrictJson<T>`: a JSON request body parsed by serde, so errors name the exact field.
//!
//! poem-openapi's own `Json` reports "expects an input value" without saying which field; this
//! payload documents the same schema (from `T`'s `Type`) but parses with serde and
//! `serde_path_to_error`, enforces the body size limit while reading (with or without a
//! `Content-Length`), and answers 400 with `field` set to the path that failed (`recipient.email`,
//! `channels[1]`).

use futures::StreamExt;
use poem::{Request, RequestBody};
use poem_openapi::{
    payload::{ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::DeserializeOwned;

use crate::errors::ApiError;

/// The body limits in force, put into the request's data by the router: one notification's
/// (and every other body's), and a batch's.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub single: usize,
    pub batch: usize,
}

/// A JSON body parsed strictly by serde; `BATCH` bodies get the batch limit.
pub struct StrictJson<T, const BATCH: bool = false>(pub T);

impl<T: Type, const BATCH: bool> Payload for StrictJson<T, BATCH> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        matches!(content_type.parse::<mime::Mime>(), Ok(ct) if ct.type_() == "application"
            && (ct.subtype() == "json" || ct.suffix().is_some_and(|s| s == "json")))
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type + DeserializeOwned, const BATCH: bool> ParsePayload for StrictJson<T, BATCH> {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let limit =
            request.data::<BodyLimit>().map(|l| if BATCH { l.batch } else { l.single }).unwrap_or(64 * 1024);
        let declared = request
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large(limit).into());
        }
        let mut stream = body.take()?.into_bytes_stream();
        let mut data = Vec::with_capacity(declared.unwrap_or(1024).min(limit));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                if timed_out(&e) {
                    ApiError::RequestTimeout(
                        "the body did not arrive in time: it must arrive within HERALD_BODY_READ_TIMEOUT of the headers"
                            .into(),
                    )
                } else {
                    ApiError::malformed(None, format!("reading the body: {e}"))
                }
            })?;
            if data.len() + chunk.len() > limit {
                return Err(too_large(limit).into());
            }
            data.extend_from_slice(&chunk);
        }
        // serde would also read a struct from a JSON array; the API takes objects only.
        match data.iter().find(|b| !b.is_ascii_whitespace()) {
            None => {
                return Err(ApiError::malformed(None, "the body is empty; a JSON object is expected").into());
            }
            Some(b'{') => {}
            Some(_) => return Err(ApiError::malformed(None, "the body must be a JSON object").into()),
        }
        let mut de = serde_json::Deserializer::from_slice(&data);
        let value = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
        de.end().map_err(|e| ApiError::malformed(None, format!("the body is not valid JSON: {e}")))?;
        Ok(StrictJson(value))
    }
}

/// Whether a body read failed because the connection's read deadline passed
/// ([`crate::limits::Guarded`]), however deep hyper wrapped the I/O error.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A serde error as a 400 naming the field that failed (none for a syntax error).
pub(crate) fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let syntax = inner.is_syntax() || inner.is_eof();
    let field = (!syntax && path != "." && path != "?").then_some(path);
    let message = if syntax {
        format!("the body is not valid JSON: {inner}")
    } else {
        match &field {
            Some(f) => format!("{f}: {inner}"),
            None => inner.to_string(),
        }
    };
    ApiError::malformed(field, message)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::TooLarge(format!("body is larger than the limit of {limit} bytes"))
}

poem_openapi::impl_apirequest_for_payload!(StrictJson<T, BATCH>, T: Type + DeserializeOwned + Send, const BATCH: bool);
