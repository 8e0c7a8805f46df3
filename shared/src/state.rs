//! What Herald knows about each notification, and the events it publishes about it.
//!
//! Two kinds of keys in the `herald_notifications` bucket:
//!
//! - `<id>`: written once by the gateway when it accepts a request (create-only): who sent it,
//!   when, and which channels it was accepted for.
//! - `<id>.<channel>`: written by that channel's worker on every attempt (a plain put: one
//!   writer per notification and channel, so no compare-and-set and no contention between
//!   channels): status, attempts, last error. It also carries tenant and correlation id, so a
//!   notification published straight to JetStream, which has no `<id>` key, is still readable.
//!
//! [`Notifications::get`] merges them into a [`NotificationRecord`]. Every attempt also
//! publishes a [`StatusEvent`] to `herald.status.<channel>.<outcome>`.

use std::{collections::BTreeMap, fmt};

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    intent::{Channel, Intent},
    topology,
};

/// Where a notification stands on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored in JetStream, not yet attempted.
    Accepted,
    /// Waiting for `send_at`.
    Scheduled,
    /// An attempt failed transiently; another is scheduled.
    Retrying,
    /// The provider accepted it.
    Delivered,
    /// Parked in the dead-letter queue.
    DeadLettered,
}

/// The outcome of one attempt, as published on `herald.status.<channel>.<outcome>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Delivered,
    Retrying,
    DeadLettered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "retrying",
            Outcome::DeadLettered => "dead_lettered",
        }
    }

    fn status(self) -> Status {
        match self {
            Outcome::Delivered => Status::Delivered,
            Outcome::Retrying => Status::Retrying,
            Outcome::DeadLettered => Status::DeadLettered,
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
    /// Attempts made so far.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// The record of one notification across its channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
    pub channels: BTreeMap<Channel, ChannelState>,
}

impl NotificationRecord {
    /// The record written when the gateway accepts `intents` (one per channel, same id).
    pub fn accepted(intents: &[Intent]) -> NotificationRecord {
        let now = Utc::now();
        let first = &intents[0];
        NotificationRecord {
            id: first.id.clone(),
            correlation_id: first.correlation_id.clone(),
            tenant: first.tenant.clone(),
            created_at: first.created_at.unwrap_or(now),
            channels: intents
                .iter()
                .map(|i| {
                    let status =
                        if i.send_at.is_some_and(|t| t > now) { Status::Scheduled } else { Status::Accepted };
                    (
                        i.channel(),
                        ChannelState {
                            status,
                            attempts: 0,
                            last_error: None,
                            updated_at: now,
                            delivered_at: None,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The overall status: the least advanced channel speaks for the notification, except
    /// that a dead-lettered channel makes the whole notification need attention.
    pub fn overall(&self) -> Status {
        let states = || self.channels.values().map(|c| c.status);
        if states().any(|s| s == Status::DeadLettered) {
            Status::DeadLettered
        } else if states().all(|s| s == Status::Delivered) {
            Status::Delivered
        } else if states().any(|s| s == Status::Retrying) {
            Status::Retrying
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

/// One attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    /// 1-based attempt number (the message's delivery count).
    pub number: u32,
    /// HERALD_INTENTS sequence of the message.
    pub sequence: u64,
    pub error: Option<String>,
}

/// A worker's key: one channel's state plus what identifies the notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelEntry {
    #[serde(flatten)]
    pub state: ChannelState,
    /// HERALD_INTENTS sequence of the message the latest attempt handled: tells a redelivery of
    /// a dead-lettered message (terminate it) from a new message for the same notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Reads and writes notification records and publishes status events.
#[derive(Clone)]
pub struct Notifications {
    /// The `herald_notifications` bucket.
    kv: kv::Store,
    /// For status events (HERALD_STATUS).
    js: jetstream::Context,
}

impl Notifications {
    pub fn new(js: jetstream::Context, kv: kv::Store) -> Notifications {
        Notifications { kv, js }
    }

    /// Writes the record of a freshly accepted notification unless one exists already.
    pub async fn create(&self, record: &NotificationRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(record).expect("a record always serializes");
        match self.kv.create(&record.id, bytes.into()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StateError::Store(e.to_string())),
        }
    }

    /// The notification as the gateway accepted it, updated by every channel's latest attempt.
    pub async fn get(&self, id: &str) -> Result<Option<NotificationRecord>, StateError> {
        let accepted: Option<NotificationRecord> = self.read(id).await?;
        // Without the gateway's key (a direct publish) any channel may have an entry.
        let channels: Vec<Channel> = match &accepted {
            Some(r) => r.channels.keys().copied().collect(),
            None => Channel::ALL.to_vec(),
        };
        let entries =
            futures::future::try_join_all(channels.iter().map(|&c| self.channel_entry(id, c))).await?;
        let mut record = accepted;
        for (channel, entry) in channels.into_iter().zip(entries) {
            let Some(entry) = entry else { continue };
            let r = record.get_or_insert_with(|| NotificationRecord {
                id: id.to_owned(),
                correlation_id: entry.correlation_id.clone(),
                tenant: entry.tenant.clone(),
                created_at: entry.created_at,
                channels: BTreeMap::new(),
            });
            r.channels.insert(channel, entry.state);
        }
        Ok(record)
    }

    /// The latest attempt's entry of one channel, if any attempt was made. An entry that cannot
    /// be read (written by hand, say) counts as none: the next attempt overwrites it, instead of
    /// blocking the notification forever.
    pub async fn channel_entry(
        &self,
        id: &str,
        channel: Channel,
    ) -> Result<Option<ChannelEntry>, StateError> {
        match self.read(&channel_key(id, channel)).await {
            Err(StateError::Corrupt(key, error)) => {
                tracing::error!(%key, %error, "unreadable notification entry; treating it as absent");
                Ok(None)
            }
            other => other,
        }
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        match self.kv.get(key).await.map_err(|e| StateError::Store(e.to_string()))? {
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|err| StateError::Corrupt(key.to_owned(), err.to_string())),
            None => Ok(None),
        }
    }

    /// Records one attempt of `intent`: publishes its status event and, at the same time,
    /// writes the channel's entry. `previous` is the entry before this attempt, if the caller
    /// read it (it keeps the last error across a successful retry). Returns once both are stored.
    pub async fn record_attempt(
        &self,
        intent: &Intent,
        attempt: Attempt,
        previous: Option<ChannelEntry>,
    ) -> Result<(), StateError> {
        let Attempt { outcome, number: attempt, sequence, error } = attempt;
        let channel = intent.channel();
        let now = Utc::now();
        let event = StatusEvent {
            notification_id: intent.id.clone(),
            channel,
            outcome,
            attempt,
            error: error.clone(),
            correlation_id: intent.correlation_id.clone(),
            at: now,
        };
        let payload = serde_json::to_vec(&event).expect("an event always serializes");
        let publish = async {
            self.js
                .publish(topology::status_subject(channel, outcome), payload.into())
                .await
                .map_err(|e| StateError::Store(e.to_string()))?
                .await
                .map_err(|e| StateError::Store(e.to_string()))
        };
        let entry = ChannelEntry {
            state: ChannelState {
                status: outcome.status(),
                attempts: attempt.max(previous.as_ref().map_or(0, |p| p.state.attempts)),
                last_error: error.or_else(|| previous.and_then(|p| p.state.last_error)),
                updated_at: now,
                delivered_at: (outcome == Outcome::Delivered).then_some(now),
            },
            sequence: Some(sequence),
            correlation_id: intent.correlation_id.clone(),
            tenant: intent.tenant.clone(),
            created_at: intent.created_at.unwrap_or(now),
        };
        let bytes = serde_json::to_vec(&entry).expect("an entry always serializes");
        let put = async {
            self.kv
                .put(channel_key(&intent.id, channel), bytes.into())
                .await
                .map_err(|e| StateError::Store(e.to_string()))
        };
        let (published, written) = tokio::join!(publish, put);
        published?;
        written.map(|_| ())
    }
}

/// `<id>.<channel>`.
fn channel_key(id: &str, channel: Channel) -> String {
    format!("{id}.{channel}")
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
