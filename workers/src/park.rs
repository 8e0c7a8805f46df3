//! Parking a message in HERALD_DLQ.

use async_nats::{HeaderMap, header::NATS_MESSAGE_ID, jetstream};
use bytes::Bytes;
use herald_shared::{
    Channel,
    deadletter::DeadLetter,
    topology::{INTENTS_STREAM, dlq_subject},
};

/// Publishes the dead letter and waits for HERALD_DLQ's ack. Callers terminate the original
/// only after this succeeded, so a message is never gone from both streams.
pub async fn park(
    js: &jetstream::Context,
    channel: Channel,
    payload: Bytes,
    original_headers: Option<&HeaderMap>,
    letter: &DeadLetter,
) -> Result<(), async_nats::Error> {
    let mut headers = letter.headers(original_headers);
    headers.insert(NATS_MESSAGE_ID, letter.message_id(INTENTS_STREAM).as_str());
    js.publish_with_headers(dlq_subject(channel), headers, payload).await?.await?;
    Ok(())
}
