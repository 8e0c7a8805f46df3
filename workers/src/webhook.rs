//! The webhook channel: a signed JSON POST to `recipient.webhook_url`.
//!
//! The body is a JSON document with the notification's id, channel, content, data, metadata and
//! timestamps. Headers: `Content-Type: application/json`, `Idempotency-Key` and
//! `Herald-Notification-Id` (both the notification id: a receiver that sees one twice has seen
//! the same notification), `Herald-Timestamp` and `Herald-Signature` (see
//! `herald_shared::signature`). Redirects are not followed: a POST must reach its URL.
//!
//! Webhook URLs come from API callers, so unless `HERALD_WEBHOOK_ALLOW_PRIVATE` is set a
//! delivery may only reach public addresses: names are resolved by [`PublicOnly`], which drops
//! loopback, private, link-local and other special addresses at connect time (no window for DNS
//! rebinding), and literal addresses are checked before sending. Only the first KiB of an error
//! answer is read.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use herald_shared::{Channel, Config, Intent, signature, state::FailureKind};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::Serialize;

use crate::provider::{Provider, ProviderError, Receipt, Sending};

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
    /// `HERALD_WEBHOOK_ALLOW_PRIVATE`.
    allow_private: bool,
}

impl WebhookSender {
    pub fn new(config: &Config) -> anyhow::Result<WebhookSender> {
        // Webhook targets are addressed directly; a proxy from the environment would silently
        // reroute (or break) them.
        let mut builder = crate::provider::http_client(config, Channel::Webhook).no_proxy();
        if !config.webhook_allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        let http = builder.build()?;
        Ok(WebhookSender {
            http,
            secret: config.webhook_secret.clone(),
            allow_private: config.webhook_allow_private,
        })
    }
}

impl Provider for WebhookSender {
    fn name(&self) -> &str {
        "webhook"
    }

    /// Each receiving host (and port) has its own breaker: one dead receiver fails fast
    /// without slowing the others.
    fn breaker_key(&self, to: &str) -> Option<String> {
        let url = url::Url::parse(to).ok()?;
        Some(format!("{}:{}", url.host_str()?, url.port_or_known_default()?))
    }

    fn send<'a>(&'a self, intent: &'a Intent, url: &'a str) -> Sending<'a> {
        Box::pin(self.post(intent, url))
    }
}

impl WebhookSender {
    async fn post(&self, intent: &Intent, url: &str) -> Result<Receipt, ProviderError> {
        let refused = |message: String| ProviderError::new(FailureKind::Rejected, message);
        if !self.allow_private {
            let parsed = url::Url::parse(url).map_err(|e| refused(e.to_string()))?;
            let literal = match parsed.host() {
                Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            };
            if literal.is_some_and(|ip| !is_public(ip)) {
                return Err(refused(PrivateAddress.to_string()));
            }
        }
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
        // The receiver can join the notification's trace (W3C `traceparent`).
        let mut trace = Vec::new();
        herald_shared::telemetry::inject(|name, value| trace.push((name.to_owned(), value)));
        let mut request = self.http.post(url);
        for (name, value) in trace {
            request = request.header(name, value);
        }
        let response = request
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &intent.id)
            .header("Herald-Notification-Id", &intent.id)
            .header("Herald-Timestamp", timestamp.to_string())
            .header(signature::HEADER, signature::sign(&self.secret, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if caused_by_private_address(&e) {
                    refused(PrivateAddress.to_string())
                } else if e.is_timeout() {
                    ProviderError::new(FailureKind::Timeout, "timed out")
                } else {
                    ProviderError::new(FailureKind::Connection, describe(&e))
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(Receipt::default());
        }
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = first_bytes(response, ERROR_BODY_BYTES).await;
        let message = format!("HTTP {status}: {}", text.chars().take(200).collect::<String>().trim());
        Err(classify(status, message, retry_after))
    }
}

/// How much of an error answer is read (for `last_error`); a receiver cannot make the worker
/// buffer more.
pub(crate) const ERROR_BODY_BYTES: usize = 1024;

/// Up to `limit` bytes of the body, as text.
pub(crate) async fn first_bytes(mut response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Why a delivery to a non-public address was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "webhook_url leads to a loopback, private or link-local address (set HERALD_WEBHOOK_ALLOW_PRIVATE=true to allow)"
)]
pub struct PrivateAddress;

/// The system resolver, minus every address that is not public.
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let public: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(PrivateAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn caused_by_private_address(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<PrivateAddress>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether an address is an ordinary public one (not loopback, private, link-local, shared,
/// documentation, multicast, unspecified, or an IPv4 one of those mapped into IPv6).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let [first, second, ..] = v6.segments();
            // NAT64 (64:ff9b::/96), 6to4 (2002::/16) and IPv4-compatible (::/96) addresses
            // lead to an IPv4 address: refuse them rather than decode each scheme.
            let embeds_ipv4 = (first == 0x64 && second == 0xff9b)
                || first == 0x2002
                || v6.segments()[..6].iter().all(|s| *s == 0);
            !(embeds_ipv4
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && second == 0x0db8)
        }
    }
}

/// An HTTP provider's error status: 408 timed out, 429 slow down, 5xx unavailable (all worth
/// retrying); 401 and 403 refuse Herald's credentials; any other answer refuses the message.
pub fn classify(status: StatusCode, message: String, retry_after: Option<Duration>) -> ProviderError {
    let kind = match status {
        StatusCode::REQUEST_TIMEOUT => FailureKind::Timeout,
        StatusCode::TOO_MANY_REQUESTS => FailureKind::RateLimited,
        s if s.is_server_error() => FailureKind::Unavailable,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FailureKind::Unauthorized,
        _ => FailureKind::Rejected,
    };
    ProviderError::new(kind, message).with_retry_after(retry_after)
}

/// `Retry-After` is either delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

pub(crate) fn describe(e: &reqwest::Error) -> String {
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
            assert_eq!(e.kind.is_transient(), transient, "{code}");
        }
    }

    #[test]
    fn only_public_addresses_are_public() {
        for (ip, public) in [
            ("93.184.216.34", true),
            ("2606:2800:220:1:248:1893:25c8:1946", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("::1", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("64:ff9b::a00:1", false),
            ("2002:a00:1::1", false),
            ("::10.0.0.1", false),
        ] {
            assert_eq!(is_public(ip.parse().unwrap()), public, "{ip}");
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
