//! The accept path: store a request's intents in JetStream, idempotently.
//!
//! 1. **Commit**: the request's key (its `Idempotency-Key`, or else its fresh notification id)
//!    is remembered in `herald_idempotency` with the notification id and a hash of the request
//!    ([`herald_shared::idempotency`]), create-only, kept for the idempotency horizon.
//! 2. **Publish**: each channel's intent goes to `herald.intent.<channel>` (or, with a future
//!    `send_at`, as a schedule that the server fires into that subject) with
//!    `Nats-Msg-Id = <length of tenant>:<tenant>:<key>:<channel>`, all at once.
//! 3. **Record**: the ledger entries are created, and the request is answered `202`.
//!
//! A request that finds its key remembered is a retry. With another body it is refused (`409
//! idempotency_key_reused`). With the same body it answers the original id with `duplicate:
//! true`; if the original request never recorded its intents (it died, or lost NATS, between
//! commit and record) the retry publishes and records them under the original id, which the
//! duplicate window and the ledger make safe to do twice. So a gateway killed at any point
//! loses nothing a client was told was accepted, and a client's retry completes what it began.

use std::time::Instant;

use async_nats::{
    connection::State,
    header::NATS_MESSAGE_ID,
    jetstream::{publish::PublishAck, stream::DirectGetErrorKind},
};
use chrono::Utc;
use herald_shared::{
    Intent,
    idempotency::{KeyRecord, Remembered},
    intent::{MAX_INTENT_BYTES, headers},
    ledger::LedgerKey,
    topology::{Topology, is_storage_full, schedule, subject_of},
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
    /// Stores `intents` (one per channel, sharing an id) under `key`; `hash` identifies the
    /// request (see [`herald_shared::idempotency::request_hash`]). A failure for want of NATS
    /// or room carries the notification id ([`ApiError::NotStored`]).
    pub async fn accept(
        &self,
        intents: Vec<Intent>,
        tenant: &str,
        key: Option<&str>,
        hash: String,
    ) -> Result<Accepted, ApiError> {
        let id = intents[0].id.clone();
        self.accept_inner(intents, tenant, key, hash).await.map_err(|e| match e {
            e @ (ApiError::Unavailable(_) | ApiError::StorageFull(_)) => {
                ApiError::NotStored { id, cause: Box::new(e) }
            }
            e => e,
        })
    }

    async fn accept_inner(
        &self,
        mut intents: Vec<Intent>,
        tenant: &str,
        key: Option<&str>,
        hash: String,
    ) -> Result<Accepted, ApiError> {
        if self.client.connection_state() != State::Connected {
            return Err(unavailable());
        }
        let topology = self.topology()?;
        if let Some(why) = self.storage_full() {
            return Err(storage_full(&why));
        }
        let started = Instant::now();
        let key = key.unwrap_or(&intents[0].id).to_owned();
        let record = KeyRecord {
            id: intents[0].id.clone(),
            hash,
            channels: intents.iter().map(Intent::channel).collect(),
            at: Utc::now(),
        };
        let remember = topology.keys.remember(Some(tenant), &key, &record);
        let duplicate = match tokio::time::timeout(self.config.nats_timeout, remember).await {
            Ok(Ok(Remembered::New)) => false,
            Ok(Ok(Remembered::Earlier(earlier))) => {
                if earlier.hash != record.hash {
                    return Err(ApiError::KeyReused(format!(
                        "this Idempotency-Key was used {} by a different request (notification {}); \
                         a retry must repeat the original request exactly, and a new notification \
                         needs a new key",
                        earlier.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        earlier.id
                    )));
                }
                intents.retain(|i| earlier.channels.contains(&i.channel()));
                for intent in &mut intents {
                    intent.id.clone_from(&earlier.id);
                }
                self.metrics.duplicates.inc();
                if intents.is_empty() || self.recorded(topology, &intents).await? {
                    return Ok(Accepted { id: earlier.id, duplicate: true });
                }
                tracing::info!(notification_id = %earlier.id, "a retry finishes what its first request began");
                true
            }
            Ok(Err(e)) if is_storage_full(&e) => {
                let why = format!("the idempotency keys are full until some expire ({e})");
                self.note_bucket_full(Some(why.clone()));
                return Err(storage_full(&why));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot remember the idempotency key");
                return Err(unavailable());
            }
            Err(_) => return Err(unavailable()),
        };
        self.config.fail_at("accept.after_commit");
        // The tenant's length keeps ids apart when a tenant or key contains ':'.
        let msg_id = |intent: &Intent| format!("{}:{tenant}:{key}:{}", tenant.len(), intent.channel());
        let acks = futures::future::try_join_all(
            intents.iter().map(|intent| self.publish(topology, intent, msg_id(intent))),
        )
        .await?;
        self.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
        if !duplicate && let Some(ack) = acks.iter().find(|a| a.duplicate) {
            // The stream knows the key but the bucket did not: a request from before the bucket
            // existed, or a horizon shorter than the duplicate window. The stream's is the
            // notification.
            let original = self.original_id(topology, ack.sequence).await?;
            if original != intents[0].id {
                tracing::warn!(notification_id = %original, "the key was known to the stream only; answering its notification");
                self.metrics.duplicates.inc();
                return Ok(Accepted { id: original, duplicate: true });
            }
        }
        if !duplicate {
            for intent in &intents {
                self.metrics
                    .accepted
                    .get_or_create(&ChannelLabel { channel: intent.channel().to_string() })
                    .inc();
            }
        }
        self.record(topology, &intents).await?;
        Ok(Accepted { id: intents[0].id.clone(), duplicate })
    }

    /// Whether every intent's ledger entry exists: the request that made them got as far as
    /// recording them, so its publishes were all acknowledged.
    async fn recorded(&self, topology: &Topology, intents: &[Intent]) -> Result<bool, ApiError> {
        let reads =
            intents.iter().map(|intent| async move { topology.ledger.read(&LedgerKey::of(intent)).await });
        let read = tokio::time::timeout(self.config.nats_timeout, futures::future::try_join_all(reads));
        match read.await {
            Ok(Ok(entries)) => Ok(entries.iter().all(|(entry, _)| entry.is_some())),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the ledger");
                Err(unavailable())
            }
            Err(_) => Err(unavailable()),
        }
    }

    /// Writes the ledger entries of stored intents, and the notification's entry in its user's
    /// history: a `202` promises the notification can be
    /// found with `GET`, so this is retried until it lands or the NATS timeout passes, and then
    /// the request fails (the intents are stored; a retry with the same key finds them as
    /// duplicates and writes the record). Create-only, so a duplicate request leaves the
    /// original entries alone.
    async fn record(&self, topology: &Topology, intents: &[Intent]) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.config.nats_timeout;
        let mut delay = std::time::Duration::from_millis(20);
        loop {
            // The user's history entry goes with the record (a repeat within two minutes is
            // dropped by its message id).
            let both = async {
                futures::try_join!(
                    async { topology.ledger.accept(intents).await.map_err(|e| e.to_string()) },
                    async { topology.history.record(intents).await.map_err(|e| e.to_string()) },
                )
            };
            let error = match tokio::time::timeout_at(deadline.into(), both).await {
                Ok(Ok(_)) => {
                    self.note_bucket_full(None);
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_owned(),
            };
            if Instant::now() + delay >= deadline {
                tracing::warn!(notification_id = %intents[0].id, %error, "the intents are stored but their record is not");
                if is_storage_full(&error) {
                    let why = format!("the ledger is full ({error})");
                    self.note_bucket_full(Some(why.clone()));
                    return Err(storage_full(&why));
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
        // The request's trace travels with the intent to its worker.
        herald_shared::telemetry::inject(|name, value| headers.insert(name, value.as_str()));
        let subject = match intent.send_at {
            Some(at) if at > Utc::now() => schedule(&mut headers, intent, at),
            _ => subject_of(intent),
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
