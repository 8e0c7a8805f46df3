//! Parking a message in HERALD_DLQ.

use async_nats::{
    HeaderMap,
    header::NATS_MESSAGE_ID,
    jetstream::{self, context::PublishErrorKind},
};
use bytes::Bytes;
use herald_shared::{
    Channel,
    deadletter::{DeadLetter, TRUNCATED_BYTES, headers},
    intent::MAX_INTENT_BYTES,
    topology::{INTENTS_STREAM, dlq_subject},
};

/// Publishes the dead letter and waits for HERALD_DLQ's ack. Callers terminate the original
/// only after this succeeded, so a message is never gone from both streams.
///
/// A payload larger than any intent may be (a direct publish near the server's max payload)
/// is parked cut to its first [`TRUNCATED_BYTES`] with `Herald-Dlq-Truncated-From` giving its
/// length, as is anything the server refuses as too large with the dead letter's headers
/// added: otherwise it could never be parked, and would be redelivered until it aged out.
pub async fn park(
    js: &jetstream::Context,
    channel: Channel,
    payload: Bytes,
    original_headers: Option<&HeaderMap>,
    letter: &DeadLetter,
) -> Result<(), async_nats::Error> {
    let mut headers = letter.headers(original_headers);
    headers.insert(NATS_MESSAGE_ID, letter.message_id(INTENTS_STREAM).as_str());
    let whole = payload.len() <= MAX_INTENT_BYTES;
    let first = if whole { payload.clone() } else { truncate(&mut headers, &payload) };
    match js.publish_with_headers(dlq_subject(channel), headers.clone(), first).await {
        Ok(ack) => {
            ack.await?;
        }
        Err(e) if whole && e.kind() == PublishErrorKind::MaxPayloadExceeded => {
            let cut = truncate(&mut headers, &payload);
            js.publish_with_headers(dlq_subject(channel), headers, cut).await?.await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn truncate(headers: &mut HeaderMap, payload: &Bytes) -> Bytes {
    headers.insert(headers::TRUNCATED_FROM, payload.len().to_string().as_str());
    payload.slice(..payload.len().min(TRUNCATED_BYTES))
}
