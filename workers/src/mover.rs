//! Dead-letters intents the server gave up redelivering.
//!
//! A worker parks what it cannot deliver itself. Only when a worker dies holding a message on
//! its last delivery does the server stop redelivering it without anyone parking it; the server
//! then emits a MAX_DELIVERIES advisory, which HERALD_ADVISORIES keeps. This mover reads those
//! advisories (for channel consumers only) and asks the ledger what to do, as a worker would
//! for a message it may not send: acknowledge the advisory if the notification was delivered
//! (only the ack was lost) or is parked already; wait while a live worker still holds the
//! claim (a slow send, not a dead one); otherwise park the intent — as `uncertain` when a claim
//! lapsed mid-send, as `max_deliveries` otherwise — and record that.
//!
//! Nothing it meets is retried forever for a reason that cannot pass: an intent no longer
//! stored is parked as an empty marker letter, and one too large to park whole is parked cut
//! (see [`park`]). Failures to reach NATS or the ledger are retried; HERALD_ADVISORIES keeps
//! the advisory as long as the intent is kept.

use std::time::Duration;

use async_nats::{
    header::NATS_MESSAGE_ID,
    jetstream::{AckKind, stream::DirectGetErrorKind},
};
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::{
    Intent,
    config::UncertainPolicy,
    deadletter::{DeadLetter, ErrorClass, Reason},
    ledger::{Begin, Settle},
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

/// What to do with an advisory.
enum Next {
    Ack,
    /// Try again after this long.
    Retry(Duration),
}

pub async fn run(
    topology: Topology,
    max_attempts: u32,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
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
                Some(Ok(message)) => match move_one(&topology, &message.payload, max_attempts).await {
                    Next::Ack => {
                        let _ = message.double_ack().await;
                    }
                    Next::Retry(delay) => {
                        let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                    }
                },
                Some(Err(e)) => tracing::debug!(error = %e, "dead-letter mover pull error"),
                None => break,
            }
        }
    }
    Ok(())
}

async fn move_one(topology: &Topology, advisory: &[u8], max_attempts: u32) -> Next {
    let retry = Next::Retry(Duration::from_secs(2));
    let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(advisory) else {
        tracing::warn!("unreadable max-deliveries advisory; skipped");
        return Next::Ack;
    };
    let Some((channel, _)) = herald_shared::topology::parse_lane_consumer(&advisory.consumer) else {
        // Someone else's consumer on HERALD_INTENTS (an operator's, say): not a delivery.
        return Next::Ack;
    };
    let sequence = advisory.stream_seq;
    let (payload, headers, subject) = match topology.intents.direct_get(sequence).await {
        Ok(m) => (m.payload, Some(m.headers), m.subject.to_string()),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
            // Aged out before anyone could park it (workers were down for days): park a marker
            // so the loss is visible in the DLQ, not only in a log line.
            tracing::error!(sequence, "max-delivered intent is no longer stored; parking a marker");
            (Bytes::new(), None, herald_shared::topology::intent_subject(channel))
        }
        Err(e) => {
            tracing::warn!(sequence, error = %e, "cannot read a max-delivered intent; will retry");
            return retry;
        }
    };
    let msg_id = headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|v| v.as_str().to_owned());
    let intent = Intent::from_message(&payload, headers.as_ref(), channel, msg_id.as_deref()).ok();
    let mut letter = DeadLetter {
        reason: Reason::MaxDeliveries,
        error_class: ErrorClass::Transient,
        attempts: advisory.deliveries,
        last_error: if payload.is_empty() {
            "no worker finished the last attempt, and the intent is no longer stored".into()
        } else {
            "no worker finished the last attempt (ack wait expired)".into()
        },
        original_subject: subject,
        original_sequence: sequence,
    };
    let mut held = None;
    if let Some(intent) = &intent {
        let ledger = &topology.ledger;
        match ledger.begin(intent, sequence, max_attempts, UncertainPolicy::Park, true, |_| true).await {
            Ok(Begin::Delivered | Begin::Decided(_) | Begin::InDlq) => return Next::Ack,
            Ok(Begin::Busy(left)) => return Next::Retry(left + Duration::from_millis(100)),
            Ok(Begin::Park { held: h, reason, error_class, error }) => {
                letter.reason = reason;
                letter.error_class = error_class;
                letter.last_error = error;
                letter.attempts = h.entry.attempts;
                held = Some(h);
            }
            Ok(Begin::Send { .. }) => unreachable!("a final delivery is never sent"),
            Err(e) => {
                tracing::warn!(sequence, error = %e, "cannot read the delivery ledger; will retry");
                return retry;
            }
        }
    }
    if let Err(e) = park(&topology.js, channel, payload, headers.as_ref(), &letter).await {
        tracing::warn!(error = %e, "cannot park a max-delivered intent; will retry");
        return retry;
    }
    tracing::warn!(sequence, %channel, reason = letter.reason.as_str(), "dead-lettered an intent the server stopped redelivering");
    if let Some(mut held) = held
        && let Err(e) = topology.ledger.settle(&mut held, Settle::Parked, Duration::from_secs(10)).await
    {
        // Parked, and the ledger says "parking": the next look parks it again (idempotently).
        tracing::warn!(error = %e, "cannot record the dead letter; will retry");
        return retry;
    }
    Next::Ack
}
