//! Push to Apple devices: the APNs provider API, over HTTP/2 only.
//!
//! Token-based authentication: an ES256 JWT (header `kid` = `HERALD_APNS_KEY_ID`, claims `iss` =
//! `HERALD_APNS_TEAM_ID` and `iat`) signed with the `.p8` key. Apple refuses a token older than
//! an hour and one replaced more often than every 20 minutes, so one token is made and reused,
//! and replaced after 50 minutes. When APNs refuses it (`403 ExpiredProviderToken` or
//! `InvalidProviderToken`) it is replaced at once and the attempt is retried; a refusal within
//! 20 minutes of such a replacement means the key, key id or team id is wrong
//! (`unauthorized`), and the token is kept rather than replaced again.
//!
//! One message is `POST {base}/3/device/{token}` with `apns-topic`, `apns-push-type: alert`,
//! `apns-priority` (10, or 5 for a `low` notification), `apns-expiration` (the notification's
//! `expires_at`, else 0: deliver now or never) and `apns-id` (the notification id, a UUID, so
//! every retry of it carries the same id). The body is `{"aps": {"alert": {"title", "body"}}}`
//! plus the data's keys at the top level. A `200` carries the message's `apns-id`. Errors are
//! `{"reason": …}` (see [`classify_error`]).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use herald_shared::{Channel, Config, Intent, config::ApnsSettings, intent::Priority, state::FailureKind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{
    provider::{Provider, ProviderError, Receipt, Sending},
    webhook::{ERROR_BODY_BYTES, classify, describe, first_bytes, parse_retry_after},
};

/// A provider token is replaced after this long (Apple: at most an hour, at least 20 minutes).
const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);
/// Apple refuses provider token updates more often than this.
const MIN_UPDATE_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// APNs, as the `apns` provider.
pub struct ApnsProvider {
    http: reqwest::Client,
    /// `{base}/3/device/`.
    device_url: String,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    token: Mutex<ProviderToken>,
}

/// The provider token in use.
#[derive(Default)]
struct ProviderToken {
    /// The JWT and when it was made.
    current: Option<(String, Instant)>,
    /// When a refused token was last dropped for a replacement. Within 20 minutes of that, a
    /// refusal means the key, key id or team id is wrong, and another replacement would only
    /// trip Apple's limit on token updates (`TooManyProviderTokenUpdates`).
    replaced_at: Option<Instant>,
    /// The `iat` of the last token made. ES256 signatures here are deterministic (RFC 6979),
    /// so a replacement made within the same second would be the refused token again: each new
    /// token is issued at least a second after the last.
    last_iat: i64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

impl ApnsProvider {
    pub fn new(settings: &ApnsSettings, config: &Config) -> anyhow::Result<ApnsProvider> {
        let key = EncodingKey::from_ec_pem(settings.key.expose().as_bytes())
            .map_err(|_| anyhow::anyhow!("HERALD_APNS_KEY is not a P-256 key in PEM (PKCS#8, .p8) form"))?;
        let timeout = config.send_timeout.for_channel(Channel::Push);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
        // APNs speaks only HTTP/2: over TLS, ALPN agrees on it; a plain `http://` base (a local
        // stand-in) gets HTTP/2 with prior knowledge.
        if settings.base_url.scheme() == "http" {
            builder = builder.http2_prior_knowledge();
        }
        let base = settings.base_url.as_str().trim_end_matches('/');
        Ok(ApnsProvider {
            http: builder.build()?,
            device_url: format!("{base}/3/device/"),
            key,
            key_id: settings.key_id.clone(),
            team_id: settings.team_id.clone(),
            topic: settings.topic.clone(),
            token: Mutex::new(ProviderToken::default()),
        })
    }

    /// The provider token to send with: the current one, or a new one once it is 50 minutes
    /// old (or was dropped after a refusal).
    fn provider_token(&self) -> Result<String, ProviderError> {
        let mut state = self.token.lock().expect("never poisoned");
        if let Some((jwt, made)) = &state.current
            && made.elapsed() < TOKEN_LIFETIME
        {
            return Ok(jwt.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let iat = chrono::Utc::now().timestamp().max(state.last_iat + 1);
        let claims = Claims { iss: &self.team_id, iat };
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            ProviderError::new(FailureKind::Unauthorized, format!("apns: signing the provider token: {e}"))
        })?;
        state.current = Some((jwt.clone(), Instant::now()));
        state.last_iat = iat;
        Ok(jwt)
    }

    /// APNs refused `jwt`: transient when it may be replaced (a new token is made for the
    /// next attempt), for good within 20 minutes of the last replacement.
    fn refused(&self, jwt: &str, error: ProviderError) -> ProviderError {
        let mut state = self.token.lock().expect("never poisoned");
        let is_current = state.current.as_ref().is_some_and(|(current, _)| current == jwt);
        if !is_current {
            // Another call replaced it already; the next attempt uses that one.
            return ProviderError { kind: FailureKind::Unavailable, ..error };
        }
        if state.replaced_at.is_some_and(|at| at.elapsed() < MIN_UPDATE_INTERVAL) {
            return error;
        }
        state.current = None;
        state.replaced_at = Some(Instant::now());
        ProviderError {
            kind: FailureKind::Unavailable,
            message: format!("{}; a new provider token is made for the next attempt", error.message),
            ..error
        }
    }

    async fn post(&self, intent: &Intent, device: &str) -> Result<Receipt, ProviderError> {
        let jwt = self.provider_token()?;
        let mut request = self
            .http
            .post(format!("{}{device}", self.device_url))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", if intent.priority == Priority::Low { "5" } else { "10" })
            .header("apns-expiration", intent.expires_at.map_or(0, |t| t.timestamp().max(0)).to_string())
            .header("content-type", "application/json")
            .body(payload(intent).to_string());
        if let Ok(id) = uuid::Uuid::parse_str(&intent.id) {
            request = request.header("apns-id", id.hyphenated().to_string());
        }
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() { FailureKind::Timeout } else { FailureKind::Connection };
            ProviderError::new(kind, format!("apns: {}", describe(&e)))
        })?;
        let status = response.status();
        if status.is_success() {
            let id = response.headers().get("apns-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
            return Ok(Receipt { provider_message_id: id, detail: None });
        }
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = first_bytes(response, ERROR_BODY_BYTES).await;
        let reason = reason(&text);
        let error = classify_error(status, reason.as_deref(), &text, retry_after);
        if matches!(reason.as_deref(), Some("ExpiredProviderToken" | "InvalidProviderToken")) {
            return Err(self.refused(&jwt, error));
        }
        Err(error)
    }
}

/// The `reason` of an APNs error body.
fn reason(body: &str) -> Option<String> {
    let doc: Value = serde_json::from_str(body).ok()?;
    doc["reason"].as_str().map(str::to_owned)
}

/// The JSON payload: `aps` with the alert, then the data's keys beside it (never replacing
/// `aps`).
pub fn payload(intent: &Intent) -> Value {
    let mut alert = Map::new();
    if let Some(title) = &intent.content.title {
        alert.insert("title".into(), json!(title));
    }
    if let Some(body) = &intent.content.body {
        alert.insert("body".into(), json!(body));
    }
    let mut root = Map::new();
    root.insert("aps".into(), json!({ "alert": alert }));
    for (k, v) in &intent.data {
        if k != "aps" {
            root.insert(k.clone(), v.clone());
        }
    }
    Value::Object(root)
}

/// APNs' error by status and reason: a device token APNs does not know (`400 BadDeviceToken`,
/// `410 Unregistered`) is gone; 403 refuses Herald's credentials; 429 slows down; 5xx is an
/// outage; any other 4xx refuses the message.
pub fn classify_error(
    status: StatusCode,
    reason: Option<&str>,
    body: &str,
    retry_after: Option<Duration>,
) -> ProviderError {
    let message = match reason {
        Some(reason) => format!("apns {reason} (HTTP {status})"),
        None => format!("apns: HTTP {status}: {}", body.chars().take(200).collect::<String>().trim()),
    };
    let e = |kind| ProviderError::new(kind, message.clone()).with_retry_after(retry_after);
    match (status.as_u16(), reason) {
        (400, Some("BadDeviceToken")) | (410, _) => e(FailureKind::InvalidRecipient).device_gone(),
        // A token of another app: the address is wrong for this topic, but the device exists.
        (400, Some("DeviceTokenNotForTopic")) => e(FailureKind::InvalidRecipient),
        (403, _) => e(FailureKind::Unauthorized),
        _ => classify(status, message, retry_after),
    }
}

impl Provider for ApnsProvider {
    fn name(&self) -> &str {
        "apns"
    }

    fn send<'a>(&'a self, intent: &'a Intent, token: &'a str) -> Sending<'a> {
        Box::pin(self.post(intent, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_errors_are_classified_by_status_and_reason() {
        for (status, reason, kind, gone) in [
            (400, "BadDeviceToken", FailureKind::InvalidRecipient, true),
            (410, "Unregistered", FailureKind::InvalidRecipient, true),
            (400, "DeviceTokenNotForTopic", FailureKind::InvalidRecipient, false),
            (400, "PayloadEmpty", FailureKind::Rejected, false),
            (413, "PayloadTooLarge", FailureKind::Rejected, false),
            (403, "ExpiredProviderToken", FailureKind::Unauthorized, false),
            (403, "BadCertificate", FailureKind::Unauthorized, false),
            (429, "TooManyRequests", FailureKind::RateLimited, false),
            (500, "InternalServerError", FailureKind::Unavailable, false),
            (503, "ServiceUnavailable", FailureKind::Unavailable, false),
        ] {
            let e = classify_error(StatusCode::from_u16(status).unwrap(), Some(reason), "", None);
            assert_eq!((e.kind, e.device_gone), (kind, gone), "{reason}");
            assert_eq!(e.message, format!("apns {reason} (HTTP {})", StatusCode::from_u16(status).unwrap()));
        }
    }

    #[test]
    fn a_refused_provider_token_is_replaced_at_most_every_20_minutes() {
        let key = include_str!("../../tests/fixtures/test-only-apns-ec-private.p8");
        let config = Config::from_pairs(&[
            (herald_shared::config::APNS_KEY, key),
            (herald_shared::config::APNS_KEY_ID, "ABC123DEFG"),
            (herald_shared::config::APNS_TEAM_ID, "DEF123GHIJ"),
            (herald_shared::config::APNS_TOPIC, "com.example"),
            (herald_shared::config::APNS_BASE_URL, "http://127.0.0.1:1"),
        ])
        .unwrap();
        let apns = ApnsProvider::new(config.providers.apns.as_ref().unwrap(), &config).unwrap();
        let first = apns.provider_token().unwrap();
        assert_eq!(apns.provider_token().unwrap(), first, "reused");
        let refusal =
            || ProviderError::new(FailureKind::Unauthorized, "apns InvalidProviderToken (HTTP 403)");
        assert_eq!(apns.refused(&first, refusal()).kind, FailureKind::Unavailable, "transient once");
        let second = apns.provider_token().unwrap();
        assert_ne!(second, first, "a new token, even within the same second");
        assert_eq!(apns.refused(&second, refusal()).kind, FailureKind::Unauthorized, "within 20 minutes");
        assert_eq!(apns.provider_token().unwrap(), second, "kept: no more updates than Apple allows");
        // Twenty minutes after the replacement, a refused token may be replaced again.
        apns.token.lock().unwrap().replaced_at = Some(Instant::now() - MIN_UPDATE_INTERVAL);
        assert_eq!(apns.refused(&second, refusal()).kind, FailureKind::Unavailable);
        assert_ne!(apns.provider_token().unwrap(), second);
    }

    #[test]
    fn the_payload_puts_data_beside_aps() {
        let mut intent: Intent = serde_json::from_value(json!({
            "recipient": {"push_tokens": ["apns:x"]},
            "content": {"title": "Shipped", "body": "Order 42"},
            "data": {"order": 42, "aps": "ignored"}
        }))
        .unwrap();
        assert_eq!(
            payload(&intent),
            json!({"aps": {"alert": {"title": "Shipped", "body": "Order 42"}}, "order": 42})
        );
        intent.content.title = None;
        assert_eq!(payload(&intent)["aps"], json!({"alert": {"body": "Order 42"}}));
    }
}
