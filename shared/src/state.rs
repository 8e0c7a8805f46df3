//! What Herald tells about a notification: the read model behind `GET /v1/notifications/{id}`
//! ([`NotificationRecord`], one [`ChannelState`] per channel) and the [`StatusEvent`] published
//! on `herald.status.<channel>.<outcome>` for every settled attempt. Both come from the delivery
//! ledger ([`crate::ledger`]), which is where they are written.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::intent::Channel;

/// Where a notification stands on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored in JetStream, not yet attempted.
    Accepted,
    /// Waiting for `send_at`.
    Scheduled,
    /// A worker is sending it now (it holds the claim).
    Sending,
    /// An attempt failed transiently; another is scheduled.
    Retrying,
    /// The provider accepted it.
    Delivered,
    /// Parked in the dead-letter queue.
    DeadLettered,
    /// Not sent because the user opted out (of the channel or the category); `note` says which
    /// rule decided.
    Suppressed,
    /// Held back by the user's quiet hours until `deferred_until`, then sent.
    Deferred,
    /// Not sent because there was nothing to send it to (no address for the channel); `note`
    /// says why, and which channel took over if one did.
    Skipped,
    /// Not sent because its user already got as many notifications of its category on this
    /// channel as `HERALD_RECIPIENT_LIMIT` allows in the window; `note` says which limit.
    Throttled,
}

impl Status {
    /// Whether nothing more will happen on this channel (a dead letter may still be replayed).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::Suppressed | Status::Skipped | Status::Throttled)
    }
}

/// The outcome of one attempt, as published on `herald.status.<channel>.<outcome>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Delivered,
    Retrying,
    DeadLettered,
    Suppressed,
    Deferred,
    Skipped,
    Throttled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "retrying",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Suppressed => "suppressed",
            Outcome::Deferred => "deferred",
            Outcome::Skipped => "skipped",
            Outcome::Throttled => "throttled",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one call to a provider failed: the single classification every channel shares, which
/// decides retry or dead letter, feeds the circuit breakers, and labels the failure metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No answer in time (`HERALD_SEND_TIMEOUT`).
    Timeout,
    /// Could not connect, or the connection broke.
    Connection,
    /// The provider asked to slow down (429, Twilio 20429, FCM `QUOTA_EXCEEDED`, APNs
    /// `TooManyRequests`).
    RateLimited,
    /// The provider is failing for now (5xx, SMTP 4xx, `UNAVAILABLE`, `INTERNAL`).
    Unavailable,
    /// Not tried: the provider's (or webhook host's) circuit breaker is open.
    CircuitOpen,
    /// The address is not usable: an invalid mailbox, number or device token.
    InvalidRecipient,
    /// The provider refused Herald's credentials or configuration.
    Unauthorized,
    /// The provider refused this message for good (another 4xx, SMTP 5xx).
    Rejected,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::Timeout,
        FailureKind::Connection,
        FailureKind::RateLimited,
        FailureKind::Unavailable,
        FailureKind::CircuitOpen,
        FailureKind::InvalidRecipient,
        FailureKind::Unauthorized,
        FailureKind::Rejected,
    ];

    /// Whether another attempt may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureKind::Timeout
                | FailureKind::Connection
                | FailureKind::RateLimited
                | FailureKind::Unavailable
                | FailureKind::CircuitOpen
        )
    }

    /// Whether it says the provider itself is unwell (counts towards its circuit breaker).
    pub fn trips_breaker(self) -> bool {
        matches!(self, FailureKind::Timeout | FailureKind::Connection | FailureKind::Unavailable)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Connection => "connection",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Unavailable => "unavailable",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::InvalidRecipient => "invalid_recipient",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Rejected => "rejected",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One call to one provider within an attempt: which provider, what it answered and how fast.
/// An attempt has one per provider tried (failover) or, for push, per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderCall {
    /// `smtp`, `smtp-2`, `twilio`, `fcm`, `apns`, `webhook`.
    pub provider: String,
    /// The provider's id for the message (SMTP `Message-ID`, Twilio `sid`, FCM `name`,
    /// `apns-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    pub latency_ms: u64,
    /// Set when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Push: the device (the last 8 characters of its token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Anything else worth knowing (SMS: segments and encoding; push: device removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One channel's part of a notification record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelState {
    pub status: Status,
    /// Sends started so far.
    pub attempts: u32,
    /// The latest failure, kept after a later attempt succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// Why it was suppressed, deferred or skipped, or that another channel stood in for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When a deferred notification is sent (the end of the user's quiet hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_until: Option<DateTime<Utc>>,
    /// The provider calls of the latest attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<ProviderCall>,
}

/// The record of one notification across its channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub id: String,
    /// Carried from the request into every log line, event and webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Who sent it; only that tenant may read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
    pub channels: BTreeMap<Channel, ChannelState>,
}

impl NotificationRecord {
    /// The overall status: the least advanced channel speaks for the notification, except
    /// that a dead-lettered channel makes the whole notification need attention.
    pub fn overall(&self) -> Status {
        let states = || self.channels.values().map(|c| c.status);
        if states().any(|s| s == Status::DeadLettered) {
            Status::DeadLettered
        } else if states().all(Status::is_final) {
            // Delivered on at least one channel, or decided on every one.
            if states().any(|s| s == Status::Delivered) {
                Status::Delivered
            } else if states().any(|s| s == Status::Suppressed) {
                Status::Suppressed
            } else if states().any(|s| s == Status::Throttled) {
                Status::Throttled
            } else {
                Status::Skipped
            }
        } else if states().any(|s| s == Status::Deferred) {
            Status::Deferred
        } else if states().any(|s| s == Status::Retrying) {
            Status::Retrying
        } else if states().any(|s| s == Status::Sending) {
            Status::Sending
        } else if states().all(|s| s == Status::Scheduled) {
            Status::Scheduled
        } else {
            Status::Accepted
        }
    }
}

/// The event published for every attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub notification_id: String,
    pub channel: Channel,
    pub outcome: Outcome,
    /// 1-based attempt number.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Why (suppressed, deferred, skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When the next attempt is due (outcome `retrying`), or the deferral ends (`deferred`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// The provider calls of this attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<ProviderCall>,
    pub at: DateTime<Utc>,
}

/// Errors talking to the notification store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("notification store: {0}")]
    Store(String),
    #[error("stored record of {0} is unreadable: {1}")]
    Corrupt(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(states: &[Status]) -> NotificationRecord {
        NotificationRecord {
            id: "n".into(),
            correlation_id: None,
            tenant: None,
            created_at: Utc::now(),
            channels: states
                .iter()
                .zip(Channel::ALL)
                .map(|(s, c)| {
                    (
                        c,
                        ChannelState {
                            status: *s,
                            attempts: 1,
                            last_error: None,
                            updated_at: Utc::now(),
                            delivered_at: None,
                            note: None,
                            deferred_until: None,
                            calls: Vec::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn overall_status_follows_the_least_advanced_channel() {
        use Status::*;
        for (states, expected) in [
            (&[Delivered][..], Delivered),
            (&[Delivered, Delivered], Delivered),
            (&[Delivered, Accepted], Accepted),
            (&[Delivered, Retrying], Retrying),
            (&[Delivered, Sending], Sending),
            (&[Sending, Retrying], Retrying),
            (&[Delivered, DeadLettered], DeadLettered),
            (&[Scheduled, Scheduled], Scheduled),
            (&[Scheduled, Accepted], Accepted),
        ] {
            assert_eq!(record(states).overall(), expected, "{states:?}");
        }
    }

    #[test]
    fn records_round_trip_as_json() {
        let r = record(&[Status::Retrying]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""email":{"status":"retrying""#), "{json}");
        assert_eq!(serde_json::from_str::<NotificationRecord>(&json).unwrap(), r);
    }
}
