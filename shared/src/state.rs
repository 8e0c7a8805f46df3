//! What Herald knows about each notification, and the events it publishes about it.
//!
//! The record of a notification lives in the `herald_notifications` bucket under its id: one
//! entry per channel with its status, attempts and last error. The gateway creates it when it
//! accepts a request (create-only, so it never overwrites a worker's newer word); workers update
//! it with compare-and-set on every attempt, creating it when a direct publisher skipped the
//! gateway. Every attempt also publishes a [`StatusEvent`] to `herald.status.<channel>.<outcome>`.

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

impl Status {
    /// Whether nothing more will happen on this channel without an operator.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::DeadLettered)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Scheduled => "scheduled",
            Status::Retrying => "retrying",
            Status::Delivered => "delivered",
            Status::DeadLettered => "dead_lettered",
        }
    }
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

    pub async fn get(&self, id: &str) -> Result<Option<NotificationRecord>, StateError> {
        Ok(self.get_entry(id).await?.map(|(record, _)| record))
    }

    async fn get_entry(&self, id: &str) -> Result<Option<(NotificationRecord, u64)>, StateError> {
        let entry = self.kv.entry(id).await.map_err(|e| StateError::Store(e.to_string()))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value)
                    .map_err(|err| StateError::Corrupt(id.to_owned(), err.to_string()))?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Reads a notification's record with its revision, for a later [`Self::record_attempt`].
    pub async fn snapshot(&self, id: &str) -> Result<Snapshot, StateError> {
        Ok(match self.get_entry(id).await? {
            Some((record, revision)) => Snapshot { record: Some(record), revision: Some(revision) },
            None => Snapshot::default(),
        })
    }

    /// Records one attempt of `intent`: publishes its status event and, at the same time,
    /// updates the record with compare-and-set (creating it if needed), starting from `known`
    /// when the caller has just read it. Returns once both are stored.
    pub async fn record_attempt(
        &self,
        intent: &Intent,
        outcome: Outcome,
        attempt: u32,
        error: Option<String>,
        known: Option<Snapshot>,
    ) -> Result<(), StateError> {
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
        let update = self.update_record(intent, outcome, attempt, error, known, now);
        let (published, updated) = tokio::join!(publish, update);
        published?;
        updated
    }

    /// Compare-and-set: another channel's worker may be writing the same record.
    async fn update_record(
        &self,
        intent: &Intent,
        outcome: Outcome,
        attempt: u32,
        error: Option<String>,
        mut known: Option<Snapshot>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let channel = intent.channel();
        for _ in 0..16 {
            let snapshot = match known.take() {
                Some(s) => s,
                None => self.snapshot(&intent.id).await?,
            };
            let mut record = snapshot.record.unwrap_or_else(|| NotificationRecord {
                id: intent.id.clone(),
                correlation_id: intent.correlation_id.clone(),
                tenant: intent.tenant.clone(),
                created_at: intent.created_at.unwrap_or(now),
                channels: BTreeMap::new(),
            });
            let state = record.channels.entry(channel).or_insert(ChannelState {
                status: Status::Accepted,
                attempts: 0,
                last_error: None,
                updated_at: now,
                delivered_at: None,
            });
            state.status = outcome.status();
            state.attempts = state.attempts.max(attempt);
            state.updated_at = now;
            if error.is_some() {
                state.last_error = error.clone();
            }
            if outcome == Outcome::Delivered {
                state.delivered_at = Some(now);
            }
            let bytes: bytes::Bytes = serde_json::to_vec(&record).expect("a record always serializes").into();
            let written = match snapshot.revision {
                Some(rev) => self
                    .kv
                    .update(&intent.id, bytes, rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
                None => self
                    .kv
                    .create(&intent.id, bytes)
                    .await
                    .map(|_| ())
                    .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
            };
            match written {
                Ok(()) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(StateError::Store(e)),
            }
        }
        Err(StateError::Store(format!("record {} kept changing under 16 attempts to update it", intent.id)))
    }
}

/// A record as read, with the revision a compare-and-set must match.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub record: Option<NotificationRecord>,
    pub revision: Option<u64>,
}

impl Snapshot {
    /// The state of one channel, if recorded.
    pub fn channel(&self, channel: Channel) -> Option<&ChannelState> {
        self.record.as_ref().and_then(|r| r.channels.get(&channel))
    }
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
