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
}

impl Status {
    /// Whether nothing more will happen on this channel (a dead letter may still be replayed).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::Suppressed | Status::Skipped)
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
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
