//! The accept path: store a request's intents in JetStream, idempotently.
//!
//! Each channel's intent is published to `herald.intent.<channel>` (or, with a future
//! `send_at`, as a schedule that the server fires into that subject) with
//! `Nats-Msg-Id = <length of tenant>:<tenant>:<idempotency key>:<channel>`. The request is answered only once
//! every intent is acknowledged. When JetStream reports the first intent as a duplicate, the
//! original notification's id is read back from the stored message and the rest of the
//! channels are published under that id (their own duplicates are dropped by the server), so a
//! client retrying a half-finished request converges on one notification.

use std::time::Instant;

use async_nats::{
    connection::State,
    header::NATS_MESSAGE_ID,
    jetstream::{publish::PublishAck, stream::DirectGetErrorKind},
};
use chrono::Utc;
use herald_shared::{
    Intent,
    intent::{MAX_INTENT_BYTES, headers},
    topology::{Topology, intent_subject, is_storage_full, schedule},
};

use crate::{AppState, errors::ApiError, metrics::ChannelLabel};

/// What the accept path did.
#[derive(Debug)]
pub struct Accepted {
    /// The notification id (the original one for a duplicate).
    pub id: String,
    /// Whether an earlier request with the same key had already stored it.
    pub duplicate: bool,
}

impl AppState {
    /// Stores `intents` (one per channel, sharing an id) under `key`.
    pub async fn accept(
        &self,
        mut intents: Vec<Intent>,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<Accepted, ApiError> {
        if self.client.connection_state() != State::Connected {
            return Err(unavailable());
        }
        let topology = self.topology()?;
        if let Some(why) = self.storage_full() {
            return Err(storage_full(&why));
        }
        let started = Instant::now();
        let key = key.map(str::to_owned).unwrap_or_else(|| intents[0].id.clone());
        // The tenant's length keeps ids apart when a tenant or key contains ':'.
        let msg_id = |intent: &Intent| format!("{}:{tenant}:{key}:{}", tenant.len(), intent.channel());

        let first = self.publish(topology, &intents[0], msg_id(&intents[0])).await?;
        let duplicate = first.duplicate;
        if duplicate {
            let original = self.original_id(topology, first.sequence).await?;
            for intent in &mut intents {
                intent.id.clone_from(&original);
            }
        }
        let rest = futures::future::try_join_all(
            intents[1..].iter().map(|intent| self.publish(topology, intent, msg_id(intent))),
        )
        .await?;
        self.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());

        if duplicate {
            self.metrics.duplicates.inc();
        } else {
            self.metrics
                .accepted
                .get_or_create(&ChannelLabel { channel: intents[0].channel().to_string() })
                .inc();
        }
        for (intent, ack) in intents[1..].iter().zip(&rest) {
            if !ack.duplicate {
                self.metrics
                    .accepted
                    .get_or_create(&ChannelLabel { channel: intent.channel().to_string() })
                    .inc();
            }
        }
        self.record(topology, &intents).await?;
        Ok(Accepted { id: intents[0].id.clone(), duplicate })
    }

    /// Writes the ledger entries of stored intents: a `202` promises the notification can be
    /// found with `GET`, so this is retried until it lands or the NATS timeout passes, and then
    /// the request fails (the intents are stored; a retry with the same key finds them as
    /// duplicates and writes the record). Create-only, so a duplicate request leaves the
    /// original entries alone.
    async fn record(&self, topology: &Topology, intents: &[Intent]) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.config.nats_timeout;
        let mut delay = std::time::Duration::from_millis(20);
        loop {
            let error = match tokio::time::timeout_at(deadline.into(), topology.ledger.accept(intents)).await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if Instant::now() + delay >= deadline {
                tracing::warn!(notification_id = %intents[0].id, %error, "the intents are stored but their record is not");
                if is_storage_full(&error) {
                    self.note_ledger_full(true);
                    return Err(storage_full(&format!("the ledger is full ({error})")));
                }
                return Err(ApiError::Unavailable(
                    "the notification is stored but its record could not be written in time; retry with the \
                     same Idempotency-Key"
                        .into(),
                ));
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// Publishes one intent and waits for JetStream's ack, within the NATS timeout.
    async fn publish(
        &self,
        topology: &Topology,
        intent: &Intent,
        msg_id: String,
    ) -> Result<PublishAck, ApiError> {
        let mut headers = intent.headers();
        headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
        let channel = intent.channel();
        let subject = match intent.send_at {
            Some(at) if at > Utc::now() => schedule(&mut headers, channel, &intent.id, at),
            _ => intent_subject(channel),
        };
        let payload = intent.encode();
        // JSON numbers can grow in MessagePack: check the stored size, not just the body's.
        if payload.len() > MAX_INTENT_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the notification is {} bytes once encoded, over the limit of {MAX_INTENT_BYTES}",
                payload.len()
            )));
        }
        let payload = payload.into();
        let publish = async { topology.js.publish_with_headers(subject, headers, payload).await?.await };
        match tokio::time::timeout(self.config.nats_timeout, publish).await {
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(e)) if is_storage_full(&e) => {
                tracing::warn!(notification_id = %intent.id, error = %e, "HERALD_INTENTS is full");
                Err(storage_full(&e.to_string()))
            }
            Ok(Err(e)) => {
                tracing::warn!(notification_id = %intent.id, error = %e, "publish failed");
                Err(unavailable())
            }
            Err(_) => {
                tracing::warn!(notification_id = %intent.id, "publish not acknowledged in time");
                Err(unavailable())
            }
        }
    }

    /// The id of the notification stored at `sequence` (the original of a duplicate).
    async fn original_id(&self, topology: &Topology, sequence: u64) -> Result<String, ApiError> {
        let lookup = tokio::time::timeout(self.config.nats_timeout, topology.intents.direct_get(sequence));
        match lookup.await {
            Ok(Ok(message)) => {
                if let Some(id) = message.headers.get(headers::NOTIFICATION_ID) {
                    return Ok(id.as_str().to_owned());
                }
                rmp_id(&message.payload).ok_or_else(|| {
                    ApiError::Conflict("this Idempotency-Key was used by a message Herald cannot read".into())
                })
            }
            // A scheduled intent's stored message is removed when it fires, and old ones age out.
            Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => Err(ApiError::Conflict(
                "this Idempotency-Key was already used, by a notification whose intent is no longer stored \
                 (already fired or expired)"
                    .into(),
            )),
            Ok(Err(_)) | Err(_) => Err(unavailable()),
        }
    }
}

/// The `id` field of a stored intent, whatever its channel or version.
fn rmp_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    rmp_serde::from_slice::<IdOnly>(payload).ok().map(|i| i.id).filter(|id| !id.is_empty())
}

fn storage_full(why: &str) -> ApiError {
    ApiError::StorageFull(format!(
        "Herald's storage is full ({why}): new notifications are refused until deliveries or retention free \
         room; nothing already accepted is lost"
    ))
}

fn unavailable() -> ApiError {
    ApiError::Unavailable(
        "NATS is unreachable or did not acknowledge in time; retry with the same Idempotency-Key".into(),
    )
}
