//! Dead-letters intents the server gave up redelivering.
//!
//! A worker parks what it cannot deliver itself. Only when a worker dies holding a message on
//! its last attempt does the server stop redelivering it without anyone parking it; the server
//! then emits a MAX_DELIVERIES advisory, which HERALD_ADVISORIES keeps. This mover reads those
//! advisories, copies the intent into HERALD_DLQ with reason `max_deliveries` (the dead letter's
//! message id makes a repeat harmless) and records it.

use std::time::Duration;

use futures::StreamExt;
use herald_shared::{
    Intent,
    deadletter::{DeadLetter, ErrorClass, Reason},
    state::Outcome,
    topology::{Topology, channel_of_intent_subject},
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::park::park;

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` used here.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
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
    let original = match topology.intents.direct_get(advisory.stream_seq).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(sequence = advisory.stream_seq, error = %e, "max-delivered intent is no longer stored");
            return true;
        }
    };
    let Some(channel) = channel_of_intent_subject(&original.subject) else {
        return true;
    };
    let letter = DeadLetter {
        reason: Reason::MaxDeliveries,
        error_class: ErrorClass::Transient,
        attempts: advisory.deliveries,
        last_error: "no worker finished the last attempt (ack wait expired)".into(),
        original_subject: original.subject.to_string(),
        original_sequence: advisory.stream_seq,
    };
    if let Err(e) =
        park(&topology.js, channel, original.payload.clone(), Some(&original.headers), &letter).await
    {
        tracing::warn!(error = %e, "cannot park a max-delivered intent; will retry");
        return false;
    }
    tracing::warn!(sequence = advisory.stream_seq, %channel, "dead-lettered an intent the server stopped redelivering");
    if let Ok(intent) = Intent::from_message(&original.payload, Some(&original.headers), channel, None) {
        let error = Some(format!("{}: {}", Reason::MaxDeliveries.as_str(), letter.last_error));
        if let Err(e) = topology
            .notifications
            .record_attempt(&intent, Outcome::DeadLettered, advisory.deliveries, error, None)
            .await
        {
            tracing::warn!(error = %e, "cannot record the dead letter");
        }
    }
    true
}
