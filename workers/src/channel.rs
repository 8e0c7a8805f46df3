//! The loop every channel worker runs.
//!
//! One durable pull consumer per channel. At most `concurrency` deliveries are in flight (a
//! semaphore; the consumer's `max_ack_pending` is twice that), so a slow provider slows only
//! its own channel and memory stays bounded. For each message:
//!
//! 1. Decode and validate; a message that fails is parked in HERALD_DLQ (`undecodable` or
//!    `invalid`) and terminated, never retried.
//! 2. The ledger: if the channel's entry says delivered, the message was sent already (the
//!    worker died or the ack was lost after the send, or the consumer was recreated); it is
//!    acked, not resent. If it says this very message was dead-lettered, it is terminated.
//! 3. An intent past `expires_at` is parked as `expired`.
//! 4. Deliver. Success: record, ack. Transient failure with attempts left: record, `Nak` with
//!    the backoff (or the provider's `Retry-After`). Permanent failure, or the last attempt:
//!    park, record, terminate.
//!
//! If the ledger cannot be read or parking fails (NATS is down), the message is `Nak`ed on the
//! retry backoff, not terminated, so nothing is lost.

use std::{sync::Arc, time::Duration};

use async_nats::{
    header::NATS_MESSAGE_ID,
    jetstream::{AckKind, Message},
};
use chrono::Utc;
use futures::StreamExt;
use herald_shared::{
    Channel, Config, Intent,
    deadletter::{DeadLetter, ErrorClass, Reason},
    state::{Attempt, ChannelEntry, Outcome, Status},
    topology::Topology,
};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use crate::{Deliver, DeliveryError, park::park};

/// Longest `Retry-After` honoured; a provider asking for more is retried after this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub struct ChannelWorker<D> {
    channel: Channel,
    config: Config,
    topology: Topology,
    deliver: Arc<D>,
}

impl<D: Deliver> ChannelWorker<D> {
    pub fn new(channel: Channel, config: Config, topology: Topology, deliver: Arc<D>) -> ChannelWorker<D> {
        ChannelWorker { channel, config, topology, deliver }
    }

    /// Pulls and delivers until `stop` turns true, then waits for in-flight deliveries.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let concurrency = self.config.webhook_concurrency;
        let limit = Arc::new(Semaphore::new(concurrency));
        let this = Arc::new(self);
        tracing::info!(channel = %this.channel, concurrency, "worker started");
        'outer: while !*stop.borrow() {
            let pull = async {
                let consumer = this.topology.channel_consumer(this.channel, &this.config).await?;
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(concurrency)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await?;
                Ok::<_, async_nats::Error>(messages)
            };
            let mut messages = match pull.await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(channel = %this.channel, error = %e, "cannot pull; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => break,
                    }
                }
            };
            loop {
                // Wait for room before taking the next message. The pull buffer still holds up to
                // `concurrency` more, delivered and waiting; the consumer's ack wait allows for it.
                let permit = tokio::select! {
                    p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = stop.changed() => break 'outer,
                };
                let next = tokio::select! {
                    n = messages.next() => n,
                    _ = stop.changed() => break 'outer,
                };
                match next {
                    Some(Ok(message)) => {
                        let worker = this.clone();
                        tokio::spawn(async move {
                            worker.handle(message).await;
                            drop(permit);
                        });
                        continue;
                    }
                    Some(Err(e)) => {
                        use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                        if !matches!(e.kind(), K::ConsumerDeleted | K::NoResponders | K::PushBasedConsumer) {
                            tracing::debug!(channel = %this.channel, error = %e, "pull error");
                            continue;
                        }
                        tracing::warn!(channel = %this.channel, error = %e, "pull stream ended; recreating");
                    }
                    None => tracing::warn!(channel = %this.channel, "pull stream ended; recreating"),
                }
                // A recreated consumer may start over from the stream's first message: let every
                // in-flight delivery record its outcome first, so the ledger knows it when its
                // message comes round again.
                drop(permit);
                drop(limit.acquire_many(concurrency as u32).await);
                continue 'outer;
            }
        }
        // Every permit back means every in-flight delivery has finished.
        let _all = limit.acquire_many(concurrency as u32).await;
        tracing::info!(channel = %this.channel, "worker stopped");
        Ok(())
    }

    async fn handle(&self, message: Message) {
        let (sequence, attempt) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered.max(1) as u32),
            Err(e) => {
                tracing::error!(error = %e, "message without JetStream metadata");
                return;
            }
        };
        let fallback_id =
            message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|v| v.as_str().to_owned());
        let intent = match Intent::from_message(
            &message.payload,
            message.headers.as_ref(),
            self.channel,
            fallback_id.as_deref(),
        ) {
            Ok(intent) => intent,
            Err(rejection) => {
                tracing::warn!(channel = %self.channel, sequence, reason = rejection.reason().as_str(), error = %rejection, "parking a message that cannot be delivered");
                let reason = rejection.reason();
                self.dead_letter(
                    &message,
                    None,
                    sequence,
                    attempt,
                    reason,
                    ErrorClass::Permanent,
                    rejection.to_string(),
                )
                .await;
                return;
            }
        };
        let span = tracing::info_span!(
            "deliver",
            channel = %self.channel,
            notification_id = %intent.id,
            correlation_id = intent.correlation_id.as_deref().unwrap_or(""),
            attempt,
        );
        self.handle_intent(message, intent, sequence, attempt).instrument(span).await;
    }

    async fn handle_intent(&self, message: Message, intent: Intent, sequence: u64, attempt: u32) {
        // The ledger, read on every delivery: a redelivery after a crash or a lost ack, and a
        // consumer recreated from the start of the stream, both bring back messages that were
        // already handled.
        let previous = match self.topology.notifications.channel_entry(&intent.id, self.channel).await {
            Ok(Some(entry)) if entry.state.status == Status::Delivered => {
                tracing::info!("already delivered; acknowledging without sending again");
                self.ack(&message, AckKind::Ack).await;
                return;
            }
            Ok(Some(entry))
                if entry.state.status == Status::DeadLettered
                    && entry.sequence.is_none_or(|s| s == sequence) =>
            {
                tracing::info!("this message is already in the DLQ; terminating it without sending");
                self.ack(&message, AckKind::Term).await;
                return;
            }
            Ok(entry) => entry,
            Err(e) => {
                // Without the ledger a send could repeat one: wait for the store instead.
                let delay = self.config.retry.jittered_delay_after(attempt);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot read the delivery ledger");
                self.ack(&message, AckKind::Nak(Some(delay))).await;
                return;
            }
        };
        if intent.expires_at.is_some_and(|t| t <= Utc::now()) {
            tracing::warn!("expired before delivery");
            self.dead_letter(
                &message,
                Some(&intent),
                sequence,
                attempt,
                Reason::Expired,
                ErrorClass::Permanent,
                "expires_at passed before delivery".into(),
            )
            .await;
            return;
        }
        match self.deliver.deliver(&intent).await {
            Ok(()) => {
                tracing::info!("delivered");
                self.record(&intent, Outcome::Delivered, attempt, sequence, None, previous).await;
                self.ack(&message, AckKind::Ack).await;
            }
            Err(DeliveryError::Transient { message: error, retry_after })
                if attempt < self.config.retry.max_attempts =>
            {
                let delay = retry_after
                    .map(|d| d.min(MAX_RETRY_AFTER))
                    .unwrap_or_else(|| self.config.retry.jittered_delay_after(attempt));
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                self.record(&intent, Outcome::Retrying, attempt, sequence, Some(error), previous).await;
                self.ack(&message, AckKind::Nak(Some(delay))).await;
            }
            Err(DeliveryError::Transient { message: error, .. }) => {
                tracing::warn!(%error, "last attempt failed; dead-lettering");
                self.dead_letter(
                    &message,
                    Some(&intent),
                    sequence,
                    attempt,
                    Reason::AttemptsExhausted,
                    ErrorClass::Transient,
                    error,
                )
                .await;
            }
            Err(DeliveryError::Permanent { message: error }) => {
                tracing::warn!(%error, "refused for good; dead-lettering");
                self.dead_letter(
                    &message,
                    Some(&intent),
                    sequence,
                    attempt,
                    Reason::Rejected,
                    ErrorClass::Permanent,
                    error,
                )
                .await;
            }
        }
    }

    /// Parks the message, records it, then terminates it (in that order).
    #[allow(clippy::too_many_arguments, reason = "each argument is a distinct fact of the dead letter")]
    async fn dead_letter(
        &self,
        message: &Message,
        intent: Option<&Intent>,
        sequence: u64,
        attempt: u32,
        reason: Reason,
        error_class: ErrorClass,
        last_error: String,
    ) {
        let letter = DeadLetter {
            reason,
            error_class,
            attempts: attempt,
            last_error: last_error.clone(),
            original_subject: message.subject.to_string(),
            original_sequence: sequence,
        };
        if let Err(e) =
            park(&self.topology.js, self.channel, message.payload.clone(), message.headers.as_ref(), &letter)
                .await
        {
            let delay = self.config.retry.jittered_delay_after(attempt);
            tracing::error!(error = %e, sequence, "cannot park in the DLQ; the message stays and will be redelivered");
            self.ack(message, AckKind::Nak(Some(delay))).await;
            return;
        }
        if let Some(intent) = intent {
            self.record(
                intent,
                Outcome::DeadLettered,
                attempt,
                sequence,
                Some(format!("{}: {last_error}", reason.as_str())),
                None,
            )
            .await;
        }
        self.ack(message, AckKind::Term).await;
    }

    async fn record(
        &self,
        intent: &Intent,
        outcome: Outcome,
        attempt: u32,
        sequence: u64,
        error: Option<String>,
        previous: Option<ChannelEntry>,
    ) {
        let attempt = Attempt { outcome, number: attempt, sequence, error };
        if let Err(e) = self.topology.notifications.record_attempt(intent, attempt, previous).await {
            tracing::error!(error = %e, "cannot record the attempt");
        }
    }

    async fn ack(&self, message: &Message, kind: AckKind) {
        if let Err(e) = message.ack_with(kind).await {
            tracing::warn!(error = %e, "ack failed; the server will redeliver");
        }
    }
}
