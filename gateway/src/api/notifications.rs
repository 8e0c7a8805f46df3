use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use herald_shared::idempotency::request_hash;
use herald_shared::{
    Channel, Intent,
    auth::{SCOPE_READ, SCOPE_SEND},
    intent::{self, Content, Priority, Recipient, Rejection, TemplateRef},
    state::{ChannelState, FailureKind, NotificationRecord, Status},
    users::{User, channels_for, user_key},
};
use poem::web::Data;
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::{Header, Path, Query},
    payload::Json,
};
use serde::{Deserialize, Serialize};

use super::Tags;
use crate::{
    AppState, CorrelationId,
    auth::BearerAuth,
    errors::{ApiError, ErrorBody, ErrorResponse},
    payload::StrictJson,
};

pub struct NotificationsApi;

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize, Serialize)]
#[oai(rename = "Channel", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ApiChannel {
    Email,
    Sms,
    Push,
    Webhook,
    Inapp,
}

impl From<ApiChannel> for Channel {
    fn from(c: ApiChannel) -> Channel {
        match c {
            ApiChannel::Email => Channel::Email,
            ApiChannel::Sms => Channel::Sms,
            ApiChannel::Push => Channel::Push,
            ApiChannel::Webhook => Channel::Webhook,
            ApiChannel::Inapp => Channel::Inapp,
        }
    }
}

impl From<Channel> for ApiChannel {
    fn from(c: Channel) -> ApiChannel {
        match c {
            Channel::Email => ApiChannel::Email,
            Channel::Sms => ApiChannel::Sms,
            Channel::Push => ApiChannel::Push,
            Channel::Webhook => ApiChannel::Webhook,
            Channel::Inapp => ApiChannel::Inapp,
        }
    }
}

/// How urgent a notification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize, Serialize)]
#[oai(rename = "Priority", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ApiPriority {
    Low,
    Normal,
    High,
    Critical,
}

/// Where a notification is delivered (direct addresses).
#[derive(Debug, Object, Deserialize, Serialize)]
#[oai(rename = "Recipient", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct RecipientBody {
    /// A user of your tenant (`/v1/users/{id}`): their addresses, locale, time zone and
    /// preferences are looked up when the notification is sent.
    user_id: Option<String>,
    /// Email address (email channel).
    email: Option<String>,
    /// Phone number in E.164 form (sms channel).
    phone: Option<String>,
    /// Device tokens (push channel).
    push_tokens: Option<Vec<String>>,
    /// Absolute http(s) URL that receives a signed POST (webhook channel).
    webhook_url: Option<String>,
}

/// Inline content.
#[derive(Debug, Object, Deserialize, Serialize)]
#[oai(rename = "Content", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct ContentBody {
    /// Short headline (push title, webhook `title`).
    title: Option<String>,
    /// Email subject.
    subject: Option<String>,
    /// Plain-text body.
    body: Option<String>,
    /// HTML body (email).
    html: Option<String>,
}

/// A notification request.
#[derive(Debug, Object, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationRequest {
    /// Who receives it.
    recipient: RecipientBody,
    /// Channels to deliver on. Omitted: every channel the recipient has an address for.
    #[oai(validator(min_items = 1))]
    channels: Option<Vec<ApiChannel>>,
    /// What to say, inline; or a `template`.
    content: Option<ContentBody>,
    /// A template code (`/v1/templates/{code}/{locale}`), rendered at send time with `data` in
    /// the recipient's locale and time zone.
    template: Option<String>,
    /// The locale to render the template in (BCP 47); default the user's, else the default.
    locale: Option<String>,
    /// Free-form JSON passed to the receiver.
    data: Option<BTreeMap<String, serde_json::Value>>,
    /// Default `normal`.
    priority: Option<ApiPriority>,
    /// Category, for preferences and filtering (at most 256 characters).
    category: Option<String>,
    /// Deliver no earlier than this instant (RFC 3339), at most 6 days ahead.
    send_at: Option<DateTime<Utc>>,
    /// Give up (dead-letter as `expired`) if not delivered by this instant (RFC 3339).
    expires_at: Option<DateTime<Utc>>,
    /// String key/values echoed to receivers and kept with the notification (at most 64).
    metadata: Option<BTreeMap<String, String>>,
    /// Makes retries safe, like the `Idempotency-Key` header (1 to 255 visible ASCII
    /// characters): how each notification of a batch carries its key. If both are given they
    /// must be equal.
    #[serde(skip_serializing)]
    idempotency_key: Option<String>,
}

/// The most notifications one batch may carry.
pub const MAX_BATCH: usize = 1000;
/// Notifications of one batch in the accept path at once.
const BATCH_IN_FLIGHT: usize = 128;

/// Many notifications in one request (the documented schema; parsing is [`BatchRequest`]'s).
#[derive(Object)]
#[oai(rename = "NotificationBatch", skip_serializing_if_is_none)]
#[allow(dead_code)] // Only its schema is used.
struct BatchSchema {
    /// 1 to 1,000 notifications, each as `POST /v1/notifications` takes it, with its own
    /// `idempotency_key` to make retrying the batch safe.
    #[oai(validator(min_items = 1, max_items = 1000))]
    notifications: Vec<NotificationRequest>,
}

/// A batch as parsed: each notification on its own, so one of the wrong shape is that
/// notification's error (`400` in its result), not the whole batch's.
pub struct BatchRequest {
    notifications: Vec<Result<NotificationRequest, ApiError>>,
}

impl<'de> Deserialize<'de> for BatchRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            notifications: Vec<serde_json::Value>,
        }
        let parse = |item: serde_json::Value| {
            if !item.is_object() {
                return Err(ApiError::malformed(None, "a notification must be a JSON object"));
            }
            serde_path_to_error::deserialize(item).map_err(crate::payload::field_error)
        };
        let raw = Raw::deserialize(d)?;
        Ok(BatchRequest { notifications: raw.notifications.into_iter().map(parse).collect() })
    }
}

impl poem_openapi::types::Type for BatchRequest {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> std::borrow::Cow<'static, str> {
        BatchSchema::name()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        BatchSchema::schema_ref()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        BatchSchema::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(std::iter::once(self))
    }
}

/// What became of one notification of a batch.
#[derive(Debug, Object)]
#[oai(rename = "BatchItemResult", skip_serializing_if_is_none)]
pub struct BatchItemBody {
    /// This notification's own HTTP status: `202` accepted, `200` a duplicate of an earlier
    /// request with its key (nothing new is sent), or the status of its error.
    status: u16,
    /// The notification id (also on a `503`: retry with it as the key if it had none).
    #[oai(skip_serializing_if_is_none)]
    id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    duplicate: Option<bool>,
    #[oai(skip_serializing_if_is_none)]
    channels: Option<Vec<ApiChannel>>,
    /// Why it was not accepted.
    #[oai(skip_serializing_if_is_none)]
    error: Option<ErrorBody>,
}

/// The answer to a batch: `results[i]` answers `notifications[i]`.
#[derive(Debug, Object)]
#[oai(rename = "BatchResult", skip_serializing_if_is_none)]
pub struct BatchBody {
    results: Vec<BatchItemBody>,
    /// Notifications stored by this request.
    accepted: u32,
    /// Notifications an earlier request with the same key had stored.
    duplicates: u32,
    /// Notifications refused (see their `error`); retry only those.
    failed: u32,
    correlation_id: String,
}

/// Where a notification stands overall or on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "Status", rename_all = "snake_case")]
pub enum ApiStatus {
    Accepted,
    Scheduled,
    Sending,
    Retrying,
    Delivered,
    DeadLettered,
    Suppressed,
    Deferred,
    Skipped,
    Throttled,
}

impl From<Status> for ApiStatus {
    fn from(s: Status) -> ApiStatus {
        match s {
            Status::Accepted => ApiStatus::Accepted,
            Status::Scheduled => ApiStatus::Scheduled,
            Status::Sending => ApiStatus::Sending,
            Status::Retrying => ApiStatus::Retrying,
            Status::Delivered => ApiStatus::Delivered,
            Status::DeadLettered => ApiStatus::DeadLettered,
            Status::Suppressed => ApiStatus::Suppressed,
            Status::Deferred => ApiStatus::Deferred,
            Status::Skipped => ApiStatus::Skipped,
            Status::Throttled => ApiStatus::Throttled,
        }
    }
}

/// The answer to an accepted request.
#[derive(Debug, Object)]
#[oai(rename = "Accepted", skip_serializing_if_is_none)]
pub struct AcceptedBody {
    /// Notification id, for `GET /v1/notifications/{id}`.
    id: String,
    /// `accepted`, or `scheduled` when `send_at` is in the future.
    status: ApiStatus,
    /// The channels it will be delivered on.
    channels: Vec<ApiChannel>,
    /// True when an earlier request with the same `Idempotency-Key` stored it; nothing new was sent.
    duplicate: bool,
    /// The correlation id carried into every log line and status event.
    correlation_id: String,
}

/// One channel of a notification.
#[derive(Debug, Object)]
#[oai(rename = "ChannelStatus", skip_serializing_if_is_none)]
pub struct ChannelStatusBody {
    channel: ApiChannel,
    status: ApiStatus,
    /// Delivery attempts so far.
    attempts: u32,
    last_error: Option<String>,
    updated_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
    /// Why it was suppressed (the rule), deferred or skipped, or which channel it stood in for.
    note: Option<String>,
    /// When a deferred notification will be sent (the end of the user's quiet hours).
    deferred_until: Option<DateTime<Utc>>,
    /// The provider calls of the latest attempt: one per provider tried, or per device.
    calls: Vec<ProviderCallBody>,
}

/// Why a provider call failed: `timeout`, `connection`, `rate_limited`, `unavailable` and
/// `circuit_open` are retried; `invalid_recipient`, `unauthorized` and `rejected` are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "FailureKind", rename_all = "snake_case")]
pub enum ApiFailureKind {
    Timeout,
    Connection,
    RateLimited,
    Unavailable,
    CircuitOpen,
    InvalidRecipient,
    Unauthorized,
    Rejected,
}

impl From<FailureKind> for ApiFailureKind {
    fn from(k: FailureKind) -> ApiFailureKind {
        match k {
            FailureKind::Timeout => ApiFailureKind::Timeout,
            FailureKind::Connection => ApiFailureKind::Connection,
            FailureKind::RateLimited => ApiFailureKind::RateLimited,
            FailureKind::Unavailable => ApiFailureKind::Unavailable,
            FailureKind::CircuitOpen => ApiFailureKind::CircuitOpen,
            FailureKind::InvalidRecipient => ApiFailureKind::InvalidRecipient,
            FailureKind::Unauthorized => ApiFailureKind::Unauthorized,
            FailureKind::Rejected => ApiFailureKind::Rejected,
        }
    }
}

/// One call to a provider within an attempt.
#[derive(Debug, Object)]
#[oai(rename = "ProviderCall", skip_serializing_if_is_none)]
pub struct ProviderCallBody {
    /// `smtp`, `smtp-2`, `twilio`, `fcm`, `apns` or `webhook`.
    provider: String,
    /// The provider's id for the message (SMTP Message-ID, Twilio sid, FCM name, apns-id).
    provider_message_id: Option<String>,
    latency_ms: u64,
    failure: Option<ApiFailureKind>,
    error: Option<String>,
    /// Push: the device, by the last 8 characters of its token.
    device: Option<String>,
    /// SMS: segments and encoding; push: whether the device was removed.
    detail: Option<String>,
}

/// A notification and where it stands.
#[derive(Debug, Object)]
#[oai(rename = "Notification", skip_serializing_if_is_none)]
pub struct NotificationBody {
    id: String,
    /// Overall: `delivered` once every channel is, `dead_lettered` if any channel is.
    status: ApiStatus,
    correlation_id: Option<String>,
    created_at: DateTime<Utc>,
    channels: Vec<ChannelStatusBody>,
}

#[derive(ApiResponse)]
enum CreateResponse {
    /// Every channel's intent is stored in JetStream; delivery follows.
    #[oai(status = 202)]
    Accepted(Json<AcceptedBody>),
}

#[derive(ApiResponse)]
enum BatchResponse {
    /// Each notification's outcome; the request itself was understood.
    #[oai(status = 200)]
    Ok(Json<BatchBody>),
}

/// A page of a user's notifications, newest first.
#[derive(Debug, Object)]
#[oai(rename = "NotificationPage", skip_serializing_if_is_none)]
pub struct NotificationPage {
    notifications: Vec<NotificationBody>,
    /// Pass as `cursor` for the next (older) page; absent on the last page. Notifications
    /// accepted meanwhile never shift a page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum ListResponse {
    /// A page of the user's notifications.
    #[oai(status = 200)]
    Ok(Json<NotificationPage>),
}

/// Default and largest page of `GET /v1/notifications`.
const DEFAULT_HISTORY_LIMIT: u32 = 50;
const MAX_HISTORY_LIMIT: u32 = 200;

#[derive(ApiResponse)]
enum GetResponse {
    /// The notification.
    #[oai(status = 200)]
    Ok(Json<NotificationBody>),
}

#[OpenApi(tag = "Tags::Notifications")]
impl NotificationsApi {
    /// Send a notification
    ///
    /// Answers 202 once every channel's intent is stored in JetStream. Send an
    /// `Idempotency-Key` to make retries safe: a repeated key within the idempotency horizon
    /// (24 hours by default) answers with the original id and `duplicate: true`, and sends
    /// nothing again; the same key with a different body is refused with 409.
    #[oai(path = "/v1/notifications", method = "post", operation_id = "send_notification")]
    async fn create(
        &self,
        auth: BearerAuth,
        request: &poem::Request,
        state: Data<&Arc<AppState>>,
        correlation: Data<&CorrelationId>,
        /// Makes retries safe: 1 to 255 visible ASCII characters.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        body: StrictJson<NotificationRequest>,
    ) -> Result<CreateResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_SEND)?;
        state.rate_limit(claims, 1)?;
        // A header that is not visible ASCII never reaches `idempotency_key`; look at it raw.
        if let Some(k) = request.headers().get("Idempotency-Key") {
            check_key(k.as_bytes(), "Idempotency-Key")?;
        }
        let mut body = body.0;
        if let Some(in_body) = &body.idempotency_key {
            check_key(in_body.as_bytes(), "idempotency_key")?;
            if idempotency_key.0.as_ref().is_some_and(|h| h != in_body) {
                return Err(ApiError::invalid(
                    "idempotency_key",
                    "differs from the Idempotency-Key header; give one, or both equal",
                )
                .into());
            }
        }
        if body.idempotency_key.is_none() {
            body.idempotency_key = idempotency_key.0;
        }
        let tenant = claims.tenant_or_sub().to_owned();
        let accepted = send(&state, &tenant, &correlation.0.0, body).await?;
        Ok(CreateResponse::Accepted(Json(accepted)))
    }

    /// Send many notifications
    ///
    /// Up to 1,000 notifications in one request, stored concurrently. Answers 200 with one
    /// result per notification, in order: `202` accepted, `200` a duplicate (its
    /// `idempotency_key` was used before; nothing new is sent), or its error (`4xx`, or `503`
    /// with the id to retry with). One notification's error never affects another: retry only
    /// the failed ones, with their keys.
    #[oai(path = "/v1/notifications/batch", method = "post", operation_id = "send_notification_batch")]
    async fn batch(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        correlation: Data<&CorrelationId>,
        body: StrictJson<BatchRequest, true>,
    ) -> Result<BatchResponse, ErrorResponse> {
        use futures::StreamExt;
        let claims = auth.require(SCOPE_SEND)?;
        let items = body.0.notifications;
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ApiError::invalid(
                "notifications",
                format!("a batch carries 1 to {MAX_BATCH} notifications, not {}", items.len()),
            )
            .into());
        }
        state.rate_limit(claims, items.len() as u64)?;
        let tenant = claims.tenant_or_sub().to_owned();
        let correlation_id = &correlation.0.0;
        let state = &*state;
        let results: Vec<BatchItemBody> = futures::stream::iter(items.into_iter().enumerate())
            .map(|(i, item)| {
                let tenant = &tenant;
                async move {
                    let checked = item.and_then(|item| match &item.idempotency_key {
                        Some(k) => check_key(k.as_bytes(), "idempotency_key").map(|()| item),
                        None => Ok(item),
                    });
                    let outcome = match checked {
                        Ok(item) => send(state, tenant, correlation_id, item).await,
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(a) => BatchItemBody {
                            status: if a.duplicate { 200 } else { 202 },
                            id: Some(a.id),
                            duplicate: Some(a.duplicate),
                            channels: Some(a.channels),
                            error: None,
                        },
                        Err(e) => {
                            let (status, mut error) = e.parts();
                            error.field = Some(match error.field.take() {
                                Some(f) => format!("notifications[{i}].{f}"),
                                None => format!("notifications[{i}]"),
                            });
                            BatchItemBody {
                                status: status.as_u16(),
                                id: error.notification_id.clone(),
                                duplicate: None,
                                channels: None,
                                error: Some(error),
                            }
                        }
                    }
                }
            })
            .buffered(BATCH_IN_FLIGHT)
            .collect()
            .await;
        let count = |f: fn(&BatchItemBody) -> bool| results.iter().filter(|r| f(r)).count() as u32;
        let accepted = count(|r| r.status == 202);
        let duplicates = count(|r| r.status == 200);
        let failed = results.len() as u32 - accepted - duplicates;
        tracing::info!(correlation_id = %correlation_id, accepted, duplicates, failed, "batch");
        Ok(BatchResponse::Ok(Json(BatchBody {
            results,
            accepted,
            duplicates,
            failed,
            correlation_id: correlation_id.clone(),
        })))
    }

    /// List a user's notifications
    ///
    /// Every notification sent to `user_id` through this API in the last 8 days (as long as
    /// their status is kept), newest first, with their status on every channel. `status` keeps
    /// those whose overall status is that one, or with `channel` that channel's status.
    #[oai(path = "/v1/notifications", method = "get", operation_id = "list_notifications")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The user (`recipient.user_id`).
        user_id: Query<String>,
        /// Only notifications in this status.
        status: Query<Option<ApiStatus>>,
        /// Only notifications sent on this channel.
        channel: Query<Option<ApiChannel>>,
        /// Only notifications created at or after this time (RFC 3339).
        since: Query<Option<DateTime<Utc>>>,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Notifications per page, 1 to 200 (default 50).
        limit: Query<Option<u32>>,
    ) -> Result<ListResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_READ)?;
        let tenant = claims.tenant_or_sub();
        if !herald_shared::users::is_valid_user_id(&user_id.0) {
            return Err(
                ApiError::invalid("user_id", "a user id is 1 to 128 characters of A-Z a-z 0-9 - _").into()
            );
        }
        let limit = match limit.0 {
            None => DEFAULT_HISTORY_LIMIT,
            Some(n @ 1..=MAX_HISTORY_LIMIT) => n,
            Some(_) => {
                return Err(ApiError::invalid("limit", format!("from 1 to {MAX_HISTORY_LIMIT}")).into());
            }
        } as usize;
        let before = match cursor.0.as_deref() {
            None => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                ApiError::invalid("cursor", "not a cursor this API gave (the `next_cursor` of a page)")
            })?),
        };
        let topology = state.topology()?;
        let owner = herald_shared::inbox::Owner { tenant: Some(tenant), user: &user_id.0 };
        let channel: Option<Channel> = channel.0.map(Into::into);
        let entries = state.within(2, topology.history.entries(owner, before, since.0)).await?;
        let mut candidates =
            entries.into_iter().filter(|(_, e)| channel.is_none_or(|c| e.channels.contains(&c))).peekable();
        let mut page = Vec::new();
        let mut last = None;
        let mut seen = std::collections::HashSet::new();
        // Statuses are read a page's worth at a time until the page is full.
        while page.len() < limit && candidates.peek().is_some() {
            let chunk: Vec<(u64, herald_shared::history::Entry)> = candidates
                .by_ref()
                .filter(|(_, e)| seen.insert(e.id.clone()))
                .take(limit - page.len())
                .collect();
            let reads = chunk.iter().map(|(_, e)| topology.ledger.record(Some(tenant), &e.id));
            let records = state.within(1, futures::future::try_join_all(reads)).await?;
            for ((sequence, _), record) in chunk.into_iter().zip(records) {
                last = Some(sequence);
                let Some(record) = record else { continue };
                let shown = match (status.0, channel) {
                    (None, _) => true,
                    (Some(want), None) => ApiStatus::from(record.overall()) == want,
                    (Some(want), Some(c)) => {
                        record.channels.get(&c).is_some_and(|s| ApiStatus::from(s.status) == want)
                    }
                };
                if shown {
                    page.push(notification_body(record));
                }
            }
        }
        let next_cursor = match (candidates.peek(), last) {
            (Some(_), Some(sequence)) => Some(sequence.to_string()),
            _ => None,
        };
        Ok(ListResponse::Ok(Json(NotificationPage { notifications: page, next_cursor })))
    }

    /// Get a notification's status
    ///
    /// Overall and per-channel status, attempts, last error and timestamps.
    #[oai(path = "/v1/notifications/:id", method = "get", operation_id = "get_notification")]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The id returned when the notification was accepted.
        id: Path<String>,
    ) -> Result<GetResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_READ)?;
        let not_found = || ApiError::NotFound(format!("no notification {:?}", id.0));
        if !intent::is_valid_id(&id.0) {
            return Err(not_found().into());
        }
        let tenant = claims.tenant_or_sub();
        // Ledger keys carry the tenant: another tenant's notification, or one published
        // straight to NATS without a tenant, is simply not there for this caller.
        let lookup = tokio::time::timeout(
            state.config.nats_timeout,
            state.topology()?.ledger.record(Some(tenant), &id.0),
        );
        let record = match lookup.await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Err(not_found().into()),
            Ok(Err(e)) => return Err(ApiError::Unavailable(e.to_string()).into()),
            Err(_) => return Err(ApiError::Unavailable("NATS did not answer in time".into()).into()),
        };
        if record.tenant.as_deref() != Some(tenant) {
            return Err(not_found().into());
        }
        Ok(GetResponse::Ok(Json(notification_body(record))))
    }
}

/// Checks an idempotency key: 1 to 255 visible ASCII characters.
fn check_key(key: &[u8], field: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 255 || !key.iter().all(u8::is_ascii_graphic) {
        return Err(ApiError::malformed(
            Some(field.to_owned()),
            format!("{field} must be 1 to 255 visible ASCII characters"),
        ));
    }
    Ok(())
}

/// Checks one notification request, resolves its channels, and stores it through the accept
/// path: what `create` and each item of `batch` do.
async fn send(
    state: &AppState,
    tenant: &str,
    correlation_id: &str,
    mut body: NotificationRequest,
) -> Result<AcceptedBody, ApiError> {
    // The request as sent (key order and spacing aside), before channels are filled in.
    let hash = request_hash(&serde_json::to_vec(&body).expect("a request always serializes"));
    let key = body.idempotency_key.take();
    let mut passed = Vec::new();
    let mut fallback = Vec::new();
    let available = &state.config.channels;
    if let Some(user_id) = body.recipient.user_id.clone() {
        let user = find_user(state, tenant, &user_id).await?;
        if body.channels.is_none() {
            let direct = recipient(&body.recipient);
            let (chosen, over, rest) = channels_for(&user, &direct, |c| available.contains(&c));
            if chosen.is_empty() {
                return Err(ApiError::invalid(
                    "recipient.user_id",
                    format!("user {user_id} has no address for any channel this Herald delivers on"),
                ));
            }
            body.channels = Some(chosen.into_iter().map(ApiChannel::from).collect());
            passed = over;
            fallback = rest;
        }
    }
    let intents = into_intents(body, tenant, correlation_id, available, fallback)?;
    let channels: Vec<ApiChannel> = intents.iter().map(|i| i.channel().into()).collect();
    let scheduled = intents[0].send_at.is_some_and(|t| t > Utc::now());
    let first = intents[0].clone();
    let accepted = state.accept(intents, tenant, key.as_deref(), hash).await?;
    if !passed.is_empty() && !accepted.duplicate {
        // The channels passed over are part of the record; the notification is stored
        // already, so a failure here is logged, not answered.
        let ledger = &state.topology()?.ledger;
        if let Err(e) = ledger.passed_over(&first, &passed).await {
            tracing::warn!(notification_id = %accepted.id, error = %e, "cannot record the channels passed over");
        }
    }
    tracing::info!(
        notification_id = %accepted.id,
        correlation_id = %correlation_id,
        duplicate = accepted.duplicate,
        ?channels,
        "accepted"
    );
    Ok(AcceptedBody {
        id: accepted.id,
        status: if scheduled { ApiStatus::Scheduled } else { ApiStatus::Accepted },
        channels,
        duplicate: accepted.duplicate,
        correlation_id: correlation_id.to_owned(),
    })
}

fn notification_body(record: NotificationRecord) -> NotificationBody {
    NotificationBody {
        status: record.overall().into(),
        id: record.id,
        correlation_id: record.correlation_id,
        created_at: record.created_at,
        channels: record
            .channels
            .into_iter()
            .map(|(channel, s): (Channel, ChannelState)| ChannelStatusBody {
                channel: channel.into(),
                status: s.status.into(),
                attempts: s.attempts,
                last_error: s.last_error,
                updated_at: s.updated_at,
                delivered_at: s.delivered_at,
                note: s.note,
                deferred_until: s.deferred_until,
                calls: s
                    .calls
                    .into_iter()
                    .map(|c| ProviderCallBody {
                        provider: c.provider,
                        provider_message_id: c.provider_message_id,
                        latency_ms: c.latency_ms,
                        failure: c.failure.map(Into::into),
                        error: c.error,
                        device: c.device,
                        detail: c.detail,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn recipient(r: &RecipientBody) -> Recipient {
    Recipient {
        user_id: r.user_id.clone(),
        email: r.email.clone(),
        phone: r.phone.clone(),
        push_tokens: r.push_tokens.clone().unwrap_or_default(),
        webhook_url: r.webhook_url.clone(),
    }
}

/// The user a notification names, from the gateway's local copy, or from the bucket when the
/// copy has not caught up with a user created a moment ago.
async fn find_user(state: &AppState, tenant: &str, id: &str) -> Result<User, ApiError> {
    let not_found = || ApiError::invalid("recipient.user_id", format!("no user {id:?}"));
    if !herald_shared::users::is_valid_user_id(id) {
        return Err(not_found());
    }
    if let Ok(Some((_, bytes))) = state.users_copy.get(&user_key(tenant, id))
        && let Ok(user) = serde_json::from_slice::<User>(&bytes)
    {
        return Ok(user);
    }
    let read = tokio::time::timeout(state.config.nats_timeout, state.topology()?.users.get(tenant, id));
    match read.await {
        Ok(Ok(Some(v))) => Ok(v.value),
        Ok(Ok(None)) => Err(not_found()),
        Ok(Err(e)) => Err(ApiError::Unavailable(e.to_string())),
        Err(_) => Err(ApiError::Unavailable("NATS did not answer in time".into())),
    }
}

/// Checks a request and splits it into one intent per channel, sharing a fresh id.
/// `available`: the channels this deployment delivers on; `fallback`: the user's channels after
/// the chosen one, which take over at send time if it cannot deliver.
fn into_intents(
    req: NotificationRequest,
    tenant: &str,
    correlation_id: &str,
    available: &[Channel],
    fallback: Vec<Channel>,
) -> Result<Vec<Intent>, ApiError> {
    let recipient = recipient(&req.recipient);
    if req.locale.is_some() && req.template.is_none() {
        return Err(ApiError::invalid("locale", "only a template is rendered in a locale"));
    }
    let channels: Vec<Channel> = match req.channels {
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::invalid("channels", "must name at least one channel"));
            }
            let mut seen = Vec::new();
            for c in list.into_iter().map(Channel::from) {
                if !seen.contains(&c) {
                    seen.push(c);
                }
            }
            seen
        }
        None => {
            let inferred: Vec<Channel> = [
                (recipient.email.is_some(), Channel::Email),
                (recipient.phone.is_some(), Channel::Sms),
                (!recipient.push_tokens.is_empty(), Channel::Push),
                (recipient.webhook_url.is_some(), Channel::Webhook),
            ]
            .into_iter()
            .filter_map(|(present, c)| present.then_some(c))
            .collect();
            if inferred.is_empty() {
                return Err(ApiError::invalid(
                    "channels",
                    "no channels given and the recipient has no address to infer one from",
                ));
            }
            inferred
        }
    };
    if let Some((i, c)) = channels.iter().enumerate().find(|(_, c)| !available.contains(c)) {
        let names: Vec<&str> = available.iter().map(|c| c.as_str()).collect();
        return Err(ApiError::invalid(
            format!("channels[{i}]"),
            format!("channel {c} is not available in this Herald (available: {})", names.join(", ")),
        ));
    }
    let content = req
        .content
        .map(|c| Content {
            title: c.title,
            subject: c.subject,
            body: c.body,
            html: c.html,
            ..Content::default()
        })
        .unwrap_or_default();
    let data: serde_json::Map<String, serde_json::Value> = req.data.unwrap_or_default().into_iter().collect();
    let now = Utc::now();
    if req.expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::invalid("expires_at", "is in the past"));
    }
    let id = intent::new_id();
    channels
        .into_iter()
        .map(|channel| {
            let intent = Intent {
                id: id.clone(),
                tenant: Some(tenant.to_owned()),
                correlation_id: Some(correlation_id.to_owned()),
                content: content.clone(),
                template: req.template.clone().map(|code| TemplateRef { code, locale: req.locale.clone() }),
                data: data.clone(),
                priority: match req.priority {
                    None | Some(ApiPriority::Normal) => Priority::Normal,
                    Some(ApiPriority::Low) => Priority::Low,
                    Some(ApiPriority::High) => Priority::High,
                    Some(ApiPriority::Critical) => Priority::Critical,
                },
                category: req.category.clone(),
                send_at: req.send_at,
                expires_at: req.expires_at,
                metadata: req.metadata.clone().unwrap_or_default(),
                created_at: Some(now),
                fallback: fallback.clone(),
                ..Intent::new(channel, recipient.clone())
            };
            intent.validate().map_err(|r| match r {
                Rejection::Invalid { field, message } => ApiError::invalid(field, message),
                Rejection::Undecodable(m) => ApiError::malformed(None, m),
            })?;
            Ok(intent)
        })
        .collect()
}
