//! `/v1/templates`: versioned, localized templates of the caller's tenant, checked when written
//! and previewed with any data (scopes `templates:read`, `templates:write`).

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use herald_shared::{
    auth::{SCOPE_TEMPLATES_READ, SCOPE_TEMPLATES_WRITE},
    template_store::{Found, TemplateStore},
    templates::{Audience, Parts, canonical_locale, valid_code},
    users::{Precondition, parse_time_zone},
};
use poem::web::Data;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Header, Path, Query},
    payload::Json,
};
use serde::Deserialize;

use super::{Tags, etag, precondition};
use crate::{
    AppState,
    auth::BearerAuth,
    errors::{ApiError, ErrorResponse},
    payload::StrictJson,
};

pub struct TemplatesApi;

/// What a template says on each channel. Every part is a handlebars template; `email_html` is
/// escaped as HTML when rendered, the others are text.
#[derive(Debug, Clone, Default, Object, Deserialize)]
#[oai(rename = "TemplateParts", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct PartsBody {
    email_subject: Option<String>,
    email_text: Option<String>,
    email_html: Option<String>,
    /// The From mailbox, e.g. `{{team}} at Acme <noreply@acme.test>`, instead of
    /// `HERALD_EMAIL_FROM`; it must render to one mailbox.
    email_from: Option<String>,
    /// The Reply-To mailbox instead of `HERALD_EMAIL_REPLY_TO`; it must render to one mailbox.
    email_reply_to: Option<String>,
    sms_text: Option<String>,
    push_title: Option<String>,
    push_body: Option<String>,
    /// Key/value pairs sent with a push notification; each value is a template.
    push_data: Option<BTreeMap<String, String>>,
    webhook_title: Option<String>,
    webhook_body: Option<String>,
    inapp_title: Option<String>,
    inapp_body: Option<String>,
}

impl From<PartsBody> for Parts {
    fn from(p: PartsBody) -> Parts {
        Parts {
            email_subject: p.email_subject,
            email_text: p.email_text,
            email_html: p.email_html,
            email_from: p.email_from,
            email_reply_to: p.email_reply_to,
            sms_text: p.sms_text,
            push_title: p.push_title,
            push_body: p.push_body,
            push_data: p.push_data.unwrap_or_default(),
            webhook_title: p.webhook_title,
            webhook_body: p.webhook_body,
            inapp_title: p.inapp_title,
            inapp_body: p.inapp_body,
        }
    }
}

impl From<Parts> for PartsBody {
    fn from(p: Parts) -> PartsBody {
        PartsBody {
            email_subject: p.email_subject,
            email_text: p.email_text,
            email_html: p.email_html,
            email_from: p.email_from,
            email_reply_to: p.email_reply_to,
            sms_text: p.sms_text,
            push_title: p.push_title,
            push_body: p.push_body,
            push_data: (!p.push_data.is_empty()).then_some(p.push_data),
            webhook_title: p.webhook_title,
            webhook_body: p.webhook_body,
            inapp_title: p.inapp_title,
            inapp_body: p.inapp_body,
        }
    }
}

/// One version of a template.
#[derive(Debug, Object)]
#[oai(rename = "Template", skip_serializing_if_is_none)]
pub struct TemplateBody {
    code: String,
    locale: String,
    /// 1 for the first write, one more for every write after it.
    version: u32,
    /// Who wrote this version (the token's subject).
    author: String,
    written_at: DateTime<Utc>,
    /// Set on a rollback: the version this one restores.
    restores: Option<u32>,
    parts: PartsBody,
}

fn body((v, _): Found) -> TemplateBody {
    TemplateBody {
        code: v.code,
        locale: v.locale,
        version: v.version,
        author: v.author,
        written_at: v.written_at,
        restores: v.restores,
        parts: v.parts.into(),
    }
}

/// A version in the history (without its parts).
#[derive(Debug, Object)]
#[oai(rename = "TemplateVersion", skip_serializing_if_is_none)]
pub struct VersionBody {
    version: u32,
    author: String,
    written_at: DateTime<Utc>,
    restores: Option<u32>,
}

/// The history of a template, oldest first. JetStream keeps a key's last 64 versions.
#[derive(Debug, Object)]
#[oai(rename = "TemplateVersions", skip_serializing_if_is_none)]
pub struct VersionsBody {
    code: String,
    locale: String,
    versions: Vec<VersionBody>,
}

/// Restore an earlier version, as a new one.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "RollbackRequest", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version whose parts the new version takes.
    #[oai(validator(minimum(value = "1")))]
    version: u32,
}

/// Render a template with given data, as a recipient would see it.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "RenderRequest", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct RenderRequest {
    /// The recipient's locale (BCP 47); the template is looked up `fr-CA` → `fr` → the default.
    locale: Option<String>,
    /// A version of the template in that locale; default the latest.
    version: Option<u32>,
    /// The recipient's time zone (IANA), for dates; default UTC.
    time_zone: Option<String>,
    /// The data the template's variables come from.
    data: Option<BTreeMap<String, serde_json::Value>>,
}

/// A rendered template.
#[derive(Debug, Object)]
#[oai(rename = "Rendered", skip_serializing_if_is_none)]
pub struct RenderedBody {
    code: String,
    /// The locale of the template used (after fallback).
    locale: String,
    version: u32,
    parts: PartsBody,
}

#[derive(ApiResponse)]
enum TemplateResponse {
    /// The template.
    #[oai(status = 200)]
    Ok(Json<TemplateBody>, #[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum VersionsResponse {
    /// Its versions.
    #[oai(status = 200)]
    Ok(Json<VersionsBody>),
}

#[derive(ApiResponse)]
enum ListResponse {
    /// The latest version of each of the tenant's templates, by code and locale.
    #[oai(status = 200)]
    Ok(Json<Vec<TemplateBody>>),
}

#[derive(ApiResponse)]
enum DeleteResponse {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}

#[derive(ApiResponse)]
enum RenderResponse {
    /// Rendered.
    #[oai(status = 200)]
    Ok(Json<RenderedBody>),
}

fn store(state: &AppState) -> Result<&TemplateStore, ApiError> {
    Ok(&state.topology()?.templates)
}

fn code(code: &str) -> Result<(), ApiError> {
    if valid_code(code) {
        Ok(())
    } else {
        Err(ApiError::invalid("code", "1 to 64 letters, digits, `_` or `-`"))
    }
}

fn locale(locale: &str) -> Result<String, ApiError> {
    canonical_locale(locale).map_err(|m| ApiError::invalid("locale", m))
}

/// Within the NATS timeout, or 503.
async fn timely<T>(
    state: &AppState,
    f: impl Future<Output = Result<T, herald_shared::template_store::StoreError>>,
) -> Result<T, ApiError> {
    state.within(2, f).await
}

/// `If-Match` for a template: absent, or the `ETag` it must still be at.
fn if_match(header: Option<&str>) -> Result<Option<u64>, ApiError> {
    match precondition(header)? {
        Precondition::None => Ok(None),
        Precondition::Revision(r) => Ok(Some(r)),
        Precondition::Exists => {
            Err(ApiError::malformed(Some("If-Match".into()), "templates take the ETag of a version, not `*`"))
        }
    }
}

fn not_found(code: &str, locale: &str) -> ApiError {
    ApiError::NotFound(format!("no template {code:?} in locale {locale:?}"))
}

#[OpenApi(tag = "Tags::Templates")]
impl TemplatesApi {
    /// Write a template
    ///
    /// Creates or replaces the template `code` in `locale` as a new version, recording who and
    /// when. Every part is checked now: a syntax error is a 400 naming the part, line and
    /// column; so are unknown helpers and partials (not supported). With `If-Match`, writes
    /// only if the template is still at that `ETag` (412 otherwise).
    #[oai(path = "/v1/templates/:code/:locale", method = "put", operation_id = "put_template")]
    async fn put(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// Letters, digits, `_` and `-`.
        code: Path<String>,
        /// BCP 47, e.g. `en`, `fr-CA`.
        locale: Path<String>,
        #[oai(name = "If-Match")] if_match_header: Header<Option<String>>,
        parts: StrictJson<PartsBody>,
    ) -> Result<TemplateResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_WRITE)?;
        self::code(&code.0)?;
        let locale = self::locale(&locale.0)?;
        let expected = if_match(if_match_header.0.as_deref())?;
        let parts: Parts = parts.0.into();
        parts.check().map_err(ApiError::from)?;
        let store = store(&state)?;
        let found = timely(
            &state,
            store.put(claims.tenant_or_sub(), &code.0, &locale, parts, &claims.sub, None, expected),
        )
        .await?;
        tracing::info!(code = %code.0, %locale, version = found.0.version, author = %claims.sub, "template written");
        let tag = etag(found.1);
        Ok(TemplateResponse::Ok(Json(body(found)), tag))
    }

    /// Read a template
    ///
    /// The latest version, or `?version=N` while it is among the 64 kept.
    #[oai(path = "/v1/templates/:code/:locale", method = "get", operation_id = "get_template")]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        code: Path<String>,
        locale: Path<String>,
        /// A version number; default the latest.
        version: Query<Option<u32>>,
    ) -> Result<TemplateResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_READ)?;
        self::code(&code.0)?;
        let locale = self::locale(&locale.0)?;
        let store = store(&state)?;
        let found = match version.0 {
            None => timely(&state, store.latest(claims.tenant_or_sub(), &code.0, &locale)).await?,
            Some(n) => timely(&state, store.version(claims.tenant_or_sub(), &code.0, &locale, n)).await?,
        };
        let found = found.ok_or_else(|| not_found(&code.0, &locale))?;
        let tag = etag(found.1);
        Ok(TemplateResponse::Ok(Json(body(found)), tag))
    }

    /// List a template's versions
    #[oai(
        path = "/v1/templates/:code/:locale/versions",
        method = "get",
        operation_id = "list_template_versions"
    )]
    async fn versions(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        code: Path<String>,
        locale: Path<String>,
    ) -> Result<VersionsResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_READ)?;
        self::code(&code.0)?;
        let locale = self::locale(&locale.0)?;
        let store = store(&state)?;
        let versions = timely(&state, store.versions(claims.tenant_or_sub(), &code.0, &locale)).await?;
        if versions.is_empty() {
            return Err(not_found(&code.0, &locale).into());
        }
        Ok(VersionsResponse::Ok(Json(VersionsBody {
            code: code.0,
            locale,
            versions: versions
                .into_iter()
                .map(|(v, _)| VersionBody {
                    version: v.version,
                    author: v.author,
                    written_at: v.written_at,
                    restores: v.restores,
                })
                .collect(),
        })))
    }

    /// Roll a template back
    ///
    /// Writes a new version with the parts of an earlier one (which must still be kept).
    #[oai(path = "/v1/templates/:code/:locale/rollback", method = "post", operation_id = "rollback_template")]
    async fn rollback(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        code: Path<String>,
        locale: Path<String>,
        request: StrictJson<RollbackRequest>,
    ) -> Result<TemplateResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_WRITE)?;
        self::code(&code.0)?;
        let locale = self::locale(&locale.0)?;
        let store = store(&state)?;
        let n = request.0.version;
        let (old, _) = timely(&state, store.version(claims.tenant_or_sub(), &code.0, &locale, n))
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "template {:?} in {locale:?} has no version {n} (kept: the last 64)",
                    code.0
                ))
            })?;
        let found = timely(
            &state,
            store.put(claims.tenant_or_sub(), &code.0, &locale, old.parts, &claims.sub, Some(n), None),
        )
        .await?;
        tracing::info!(code = %code.0, %locale, version = found.0.version, restores = n, author = %claims.sub, "template rolled back");
        let tag = etag(found.1);
        Ok(TemplateResponse::Ok(Json(body(found)), tag))
    }

    /// Delete a template
    #[oai(path = "/v1/templates/:code/:locale", method = "delete", operation_id = "delete_template")]
    async fn delete(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        code: Path<String>,
        locale: Path<String>,
    ) -> Result<DeleteResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_WRITE)?;
        self::code(&code.0)?;
        let locale = self::locale(&locale.0)?;
        let store = store(&state)?;
        timely(&state, store.delete(claims.tenant_or_sub(), &code.0, &locale)).await?;
        tracing::info!(code = %code.0, %locale, author = %claims.sub, "template deleted");
        Ok(DeleteResponse::Deleted)
    }

    /// List templates
    #[oai(path = "/v1/templates", method = "get", operation_id = "list_templates")]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
    ) -> Result<ListResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_READ)?;
        let store = store(&state)?;
        let all = timely(&state, store.list(claims.tenant_or_sub())).await?;
        Ok(ListResponse::Ok(Json(all.into_iter().map(body).collect())))
    }

    /// Preview a template
    ///
    /// Renders the template (looked up `fr-CA` → `fr` → the default locale) with the given
    /// data, locale and time zone, as a recipient would receive it. A variable the data lacks
    /// is a 422 naming it.
    #[oai(path = "/v1/templates/:code/render", method = "post", operation_id = "render_template")]
    async fn render(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        code: Path<String>,
        request: StrictJson<RenderRequest>,
    ) -> Result<RenderResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_TEMPLATES_READ)?;
        self::code(&code.0)?;
        let request = request.0;
        let wanted = match &request.locale {
            Some(l) => self::locale(l)?,
            None => state.config.default_locale.clone(),
        };
        let time_zone = match &request.time_zone {
            Some(tz) => parse_time_zone(tz).ok_or_else(|| {
                ApiError::invalid(
                    "time_zone",
                    format!("{tz:?} is not an IANA time zone such as Europe/Paris"),
                )
            })?,
            None => chrono_tz::UTC,
        };
        let store = store(&state)?;
        let t = claims.tenant_or_sub();
        let found = match request.version {
            None => timely(&state, store.resolve(t, &code.0, &wanted, &state.config.default_locale)).await?,
            Some(n) => timely(&state, store.version(t, &code.0, &wanted, n)).await?,
        };
        let (version, _) = found.ok_or_else(|| not_found(&code.0, &wanted))?;
        let data = serde_json::Value::Object(request.data.unwrap_or_default().into_iter().collect());
        let audience = Audience { locale: wanted, time_zone };
        let rendered = state.renderer.render(&version.parts, &data, &audience).map_err(ApiError::from)?;
        Ok(RenderResponse::Ok(Json(RenderedBody {
            code: version.code,
            locale: version.locale,
            version: version.version,
            parts: rendered.into(),
        })))
    }
}
