//! Dead-letters intents the server gave up redelivering.
//!
//! A worker parks what it cannot deliver itself. Only when a worker dies holding a message on
//! its last attempt does the server stop redelivering it without anyone parking it; the server
//! then emits a MAX_DELIVERIES advisory, which HERALD_ADVISORIES keeps. This mover reads those
//! advisories (for channel consumers only), checks the delivery ledger (the last attempt may have
//! been delivered with only its ack lost), copies the intent into HERALD_DLQ with reason
//! `max_deliveries` and records it. A read that fails for any reason but "not found" is retried.

use std::time::Duration;

use async_nats::{header::NATS_MESSAGE_ID, jetstream::stream::DirectGetErrorKind};
use futures::StreamExt;
use herald_shared::{
    Channel, Intent,
    deadletter::{DeadLetter, ErrorClass, Reason},
    state::{Attempt, Outcome, Status},
    topology::Topology,
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::park::park;

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` used here.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    /// The consumer that gave up: only channel workers' durables are Herald's to act on.
    consumer: String,
    stream_seq: u64,
    deliveries: u32,
}

pub async fn run(topology: Topology, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    while !*stop.borrow() {
        let messages = match topology.dlq_mover_consumer().await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dead-letter mover cannot pull; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        loop {
            let next = tokio::select! {
                n = messages.next() => n,
                _ = stop.changed() => return Ok(()),
            };
            match next {
                Some(Ok(message)) => {
                    if move_one(&topology, &message.payload).await {
                        let _ = message.ack().await;
                    } else {
                        let _ = message
                            .ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(2))))
                            .await;
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "dead-letter mover pull error"),
                None => break,
            }
        }
    }
    Ok(())
}

/// Returns false when the move should be tried again later.
async fn move_one(topology: &Topology, advisory: &[u8]) -> bool {
    let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(advisory) else {
        tracing::warn!("unreadable max-deliveries advisory; skipped");
        return true;
    };
    let Ok(channel) = advisory.consumer.parse::<Channel>() else {
        // Someone else's consumer on HERALD_INTENTS (an operator's, say): not a delivery.
        return true;
    };
    let sequence = advisory.stream_seq;
    let original = match topology.intents.direct_get(sequence).await {
        Ok(m) => m,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
            tracing::error!(sequence, "max-delivered intent is no longer stored; nothing to park");
            return true;
        }
        Err(e) => {
            tracing::warn!(sequence, error = %e, "cannot read a max-delivered intent; will retry");
            return false;
        }
    };
    let msg_id = original.headers.get(NATS_MESSAGE_ID).map(|v| v.as_str().to_owned());
    let intent =
        Intent::from_message(&original.payload, Some(&original.headers), channel, msg_id.as_deref()).ok();
    if let Some(intent) = &intent {
        // The last attempt may have been delivered and recorded with only its ack lost.
        match topology.notifications.channel_entry(&intent.id, channel).await {
            Ok(Some(entry))
                if entry.state.status == Status::Delivered
                    || (entry.state.status == Status::DeadLettered && entry.sequence == Some(sequence)) =>
            {
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(sequence, error = %e, "cannot read the delivery ledger; will retry");
                return false;
            }
        }
    }
    let letter = DeadLetter {
        reason: Reason::MaxDeliveries,
        error_class: ErrorClass::Transient,
        attempts: advisory.deliveries,
        last_error: "no worker finished the last attempt (ack wait expired)".into(),
        original_subject: original.subject.to_string(),
        original_sequence: sequence,
    };
    if let Err(e) =
        park(&topology.js, channel, original.payload.clone(), Some(&original.headers), &letter).await
    {
        tracing::warn!(error = %e, "cannot park a max-delivered intent; will retry");
        return false;
    }
    tracing::warn!(sequence, %channel, "dead-lettered an intent the server stopped redelivering");
    if let Some(intent) = &intent {
        let attempt = Attempt {
            outcome: Outcome::DeadLettered,
            number: advisory.deliveries,
            sequence,
            error: Some(format!("{}: {}", Reason::MaxDeliveries.as_str(), letter.last_error)),
        };
        if let Err(e) = topology.notifications.record_attempt(intent, attempt, None).await {
            tracing::warn!(error = %e, "cannot record the dead letter");
        }
    }
    true
}
