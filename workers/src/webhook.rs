//! The webhook channel: a signed JSON POST to `recipient.webhook_url`.
//!
//! The body is a JSON document with the notification's id, channel, content, data, metadata and
//! timestamps. Headers: `Content-Type: application/json`, `Idempotency-Key` and
//! `Herald-Notification-Id` (both the notification id: a receiver that sees one twice has seen
//! the same notification), `Herald-Timestamp` and `Herald-Signature` (see
//! `herald_shared::signature`). Redirects are not followed: a POST must reach its URL.

use std::time::Duration;

use chrono::Utc;
use herald_shared::{Config, Intent, signature};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::Serialize;

use crate::{Deliver, DeliveryError};

/// The JSON document a webhook receives.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    pub id: &'a str,
    pub channel: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a str>,
    pub data: &'a serde_json::Map<String, serde_json::Value>,
    pub metadata: &'a std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'a str>,
    pub priority: herald_shared::intent::Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<&'a str>,
    pub created_at: chrono::DateTime<Utc>,
}

pub struct WebhookSender {
    http: reqwest::Client,
    /// HMAC key for `Herald-Signature`.
    secret: String,
}

impl WebhookSender {
    pub fn new(config: &Config) -> anyhow::Result<WebhookSender> {
        let http = reqwest::Client::builder()
            .timeout(config.webhook_timeout)
            .connect_timeout(config.webhook_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            // Webhook targets are addressed directly; a proxy from the environment would
            // silently reroute (or break) them.
            .no_proxy()
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.webhook_concurrency)
            .build()?;
        Ok(WebhookSender { http, secret: config.webhook_secret.clone() })
    }
}

impl Deliver for WebhookSender {
    async fn deliver(&self, intent: &Intent) -> Result<(), DeliveryError> {
        let url = intent
            .recipient
            .webhook_url
            .as_deref()
            .ok_or_else(|| DeliveryError::Permanent { message: "recipient has no webhook_url".into() })?;
        let body = serde_json::to_vec(&WebhookBody {
            id: &intent.id,
            channel: "webhook",
            title: intent.content.title.as_deref(),
            subject: intent.content.subject.as_deref(),
            body: intent.content.body.as_deref(),
            data: &intent.data,
            metadata: &intent.metadata,
            category: intent.category.as_deref(),
            priority: intent.priority,
            correlation_id: intent.correlation_id.as_deref(),
            created_at: intent.created_at.unwrap_or_else(Utc::now),
        })
        .expect("a webhook body always serializes");
        let timestamp = Utc::now().timestamp();
        let response = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &intent.id)
            .header("Herald-Notification-Id", &intent.id)
            .header("Herald-Timestamp", timestamp.to_string())
            .header(signature::HEADER, signature::sign(&self.secret, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Transient { message: describe(&e), retry_after: None })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = response.text().await.unwrap_or_default();
        let message = format!("HTTP {status}: {}", text.chars().take(200).collect::<String>().trim());
        Err(classify(status, message, retry_after))
    }
}

/// 408, 429 and 5xx are worth retrying; any other non-2xx answer is final.
pub fn classify(status: StatusCode, message: String, retry_after: Option<Duration>) -> DeliveryError {
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        DeliveryError::Transient { message, retry_after }
    } else {
        DeliveryError::Permanent { message }
    }
}

/// `Retry-After` is either delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("connection failed: {e}")
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for (code, transient) in [
            (500, true),
            (503, true),
            (408, true),
            (429, true),
            (400, false),
            (404, false),
            (410, false),
            (301, false),
        ] {
            let e = classify(StatusCode::from_u16(code).unwrap(), String::new(), None);
            assert_eq!(matches!(e, DeliveryError::Transient { .. }), transient, "{code}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = (Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(55) && d <= Duration::from_secs(60), "{d:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }
}
