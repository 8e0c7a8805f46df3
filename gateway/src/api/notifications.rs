use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
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
    param::{Header, Path},
    payload::Json,
};
use serde::Deserialize;

use super::Tags;
use crate::{
    AppState, CorrelationId,
    auth::BearerAuth,
    errors::{ApiError, ErrorResponse},
    payload::StrictJson,
};

pub struct NotificationsApi;

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename = "Priority", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ApiPriority {
    Low,
    Normal,
    High,
    Critical,
}

/// Where a notification is delivered (direct addresses).
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "Recipient")]
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
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "Content")]
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
#[derive(Debug, Object, Deserialize)]
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
        }
    }
}

/// The answer to an accepted request.
#[derive(Debug, Object)]
#[oai(rename = "Accepted")]
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
#[oai(rename = "ChannelStatus")]
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
#[oai(rename = "ProviderCall")]
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
#[oai(rename = "Notification")]
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
    /// `Idempotency-Key` to make retries safe: a repeated key within the duplicate window
    /// answers with the original id and `duplicate: true`, and sends nothing again.
    #[oai(path = "/v1/notifications", method = "post", operation_id = "createNotification")]
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
        let key = idempotency_key.0.as_deref();
        // A header that is not visible ASCII never reaches `idempotency_key`; look at it raw.
        let raw_key = request.headers().get("Idempotency-Key").map(|v| v.as_bytes());
        if let Some(k) = raw_key
            && (k.is_empty() || k.len() > 255 || !k.iter().all(u8::is_ascii_graphic))
        {
            return Err(ApiError::malformed(
                Some("Idempotency-Key".into()),
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
            .into());
        }
        let tenant = claims.tenant.clone().unwrap_or_else(|| claims.sub.clone());
        let mut body = body.0;
        let mut passed = Vec::new();
        let mut fallback = Vec::new();
        let available = &state.config.channels;
        if let Some(user_id) = body.recipient.user_id.clone() {
            let user = find_user(&state, &tenant, &user_id).await?;
            if body.channels.is_none() {
                let direct = recipient(&body.recipient);
                let (chosen, over, rest) = channels_for(&user, &direct, |c| available.contains(&c));
                if chosen.is_empty() {
                    return Err(ApiError::invalid(
                        "recipient.user_id",
                        format!("user {user_id} has no address for any channel this Herald delivers on"),
                    )
                    .into());
                }
                body.channels = Some(chosen.into_iter().map(ApiChannel::from).collect());
                passed = over;
                fallback = rest;
            }
        }
        let intents = into_intents(body, &tenant, &correlation.0.0, available, fallback)?;
        let channels: Vec<ApiChannel> = intents.iter().map(|i| i.channel().into()).collect();
        let scheduled = intents[0].send_at.is_some_and(|t| t > Utc::now());
        let first = intents[0].clone();
        let accepted = state.accept(intents, &tenant, key).await?;
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
            correlation_id = %correlation.0.0,
            duplicate = accepted.duplicate,
            ?channels,
            "accepted"
        );
        Ok(CreateResponse::Accepted(Json(AcceptedBody {
            id: accepted.id,
            status: if scheduled { ApiStatus::Scheduled } else { ApiStatus::Accepted },
            channels,
            duplicate: accepted.duplicate,
            correlation_id: correlation.0.0.clone(),
        })))
    }

    /// Get a notification's status
    ///
    /// Overall and per-channel status, attempts, last error and timestamps.
    #[oai(path = "/v1/notifications/:id", method = "get", operation_id = "getNotification")]
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
        let tenant = claims.tenant.as_deref().unwrap_or(&claims.sub);
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
