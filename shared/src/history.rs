//! Each user's notifications, for `GET /v1/notifications?user_id=`.
//!
//! The ledger is keyed by notification, so it cannot say which notifications a user has. The
//! gateway adds one small entry per accepted notification that names a user to HERALD_HISTORY,
//! on the user's subject `herald.history.<tenant token>.<user>`, beside the ledger record; a
//! listing reads that one subject newest first and asks the ledger for each notification's
//! status. Entries live as long as the ledger's (8 days), at most
//! [`HISTORY_PER_USER`](crate::topology::HISTORY_PER_USER) per user.

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    Channel, Intent,
    inbox::{InboxError, Owner, read_subject},
    ledger::tenant_token,
    topology::HISTORY_STREAM,
};

/// One notification in a user's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    /// The channels it was stored for.
    pub channels: Vec<Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `herald.history.<tenant token>.<user>`.
pub fn subject(owner: Owner<'_>) -> String {
    format!("herald.history.{}", owner.token())
}

/// HERALD_HISTORY.
#[derive(Clone)]
pub struct History {
    js: jetstream::Context,
}

impl History {
    pub fn new(js: jetstream::Context) -> History {
        History { js }
    }

    /// Adds the notification these intents (its channels) make to its user's history, if it
    /// names one. A repeat within two minutes (a retried request) adds nothing.
    pub async fn record(&self, intents: &[Intent]) -> Result<(), InboxError> {
        let Some(first) = intents.first() else { return Ok(()) };
        let Some(user) = first.recipient.user_id.as_deref() else { return Ok(()) };
        let owner = Owner { tenant: first.tenant.as_deref(), user };
        let entry = Entry {
            id: first.id.clone(),
            channels: intents.iter().map(Intent::channel).collect(),
            category: first.category.clone(),
            created_at: first.created_at.unwrap_or_else(Utc::now),
        };
        let payload = serde_json::to_vec(&entry).map_err(|e| InboxError::Store(e.to_string()))?;
        let message = PublishMessage::build().payload(Bytes::from(payload)).message_id(format!(
            "{}.{}",
            tenant_token(owner.tenant),
            first.id
        ));
        let ack = self
            .js
            .send_publish(subject(owner), message)
            .await
            .map_err(|e| InboxError::Store(e.to_string()))?;
        ack.await.map_err(|e| InboxError::Store(e.to_string()))?;
        Ok(())
    }

    /// `owner`'s entries newest first, each with its sequence (the cursor): those below
    /// `before`, created at or after `since`.
    pub async fn entries(
        &self,
        owner: Owner<'_>,
        before: Option<u64>,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<(u64, Entry)>, InboxError> {
        // Everything of the user (at most HISTORY_PER_USER entries); `since` filters below.
        let messages = read_subject(&self.js, HISTORY_STREAM, &subject(owner), 1).await?;
        let mut out: Vec<(u64, Entry)> = messages
            .into_iter()
            .filter(|(sequence, _, _)| before.is_none_or(|b| *sequence < b))
            .filter_map(|(sequence, _, payload)| {
                Some((sequence, serde_json::from_slice::<Entry>(&payload).ok()?))
            })
            .filter(|(_, e)| since.is_none_or(|t| e.created_at >= t))
            .collect();
        out.reverse();
        Ok(out)
    }
}
