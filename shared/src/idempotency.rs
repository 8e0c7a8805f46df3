//! Idempotency keys, remembered for a horizon (24 hours by default) in `herald_idempotency`.
//!
//! HERALD_INTENTS's duplicate window (`Nats-Msg-Id`) only lasts minutes: each id it holds costs
//! the server memory for the whole window. A key is instead remembered in a bucket, one entry
//! per (tenant, key), created with a per-key TTL so JetStream itself forgets it when the horizon
//! passes; nothing sweeps.
//!
//! Remembering the key is the accept path's commit point. The entry names the notification id
//! and a hash of the request, and is written before any intent is published:
//! - the first request creates it, then publishes and records its intents;
//! - a retry finds it: the same request gets the original id (and the gateway finishes the
//!   publish if the first request died before it), a different request under the same key is
//!   refused, naming the mismatch.
//!
//! Requests without a key are remembered under their own notification id, so a client that got
//! a `503` (whose body carries that id) can retry with the id as its key and converge.

use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{intent::Channel, ledger::tenant_token, state::StateError};

/// What a key is remembered as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The notification the key made.
    pub id: String,
    /// The request's canonical form hashed ([`request_hash`]).
    pub hash: String,
    /// The channels its intents were stored for.
    pub channels: Vec<Channel>,
    pub at: DateTime<Utc>,
}

/// Whether a key was new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remembered {
    /// This request is the first with the key; go on and publish.
    New,
    /// An earlier request holds the key.
    Earlier(KeyRecord),
}

/// The idempotency bucket.
#[derive(Clone)]
pub struct Keys {
    kv: kv::Store,
    horizon: Duration,
}

impl Keys {
    pub fn new(kv: kv::Store, horizon: Duration) -> Keys {
        Keys { kv, horizon }
    }

    /// How long a key is remembered.
    pub fn horizon(&self) -> Duration {
        self.horizon
    }

    /// Remembers `key` of `tenant` as `record`, unless an earlier request did: then answers
    /// that request's record. The write is create-only with the horizon as its TTL.
    pub async fn remember(
        &self,
        tenant: Option<&str>,
        key: &str,
        record: &KeyRecord,
    ) -> Result<Remembered, StateError> {
        let name = kv_key(tenant, key);
        let bytes = serde_json::to_vec(record).expect("a key record always serializes");
        // A lost answer to a create that landed, or two requests at once: read what is there.
        // A key that expires between the failed create and the read is created again.
        for _ in 0..3 {
            match self.kv.create_with_ttl(&name, bytes.clone().into(), self.horizon).await {
                Ok(_) => return Ok(Remembered::New),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(StateError::Store(e.to_string())),
            }
            match self.kv.entry(&name).await.map_err(|e| StateError::Store(e.to_string()))? {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    return serde_json::from_slice(&entry.value).map(Remembered::Earlier).map_err(|e| {
                        StateError::Store(format!("unreadable idempotency record {name}: {e}"))
                    });
                }
                _ => continue,
            }
        }
        Err(StateError::Store(format!("idempotency key {name} keeps changing")))
    }
}

/// `<tenant token>.<hash of the key>`: any key of any length and alphabet is one token.
pub fn kv_key(tenant: Option<&str>, key: &str) -> String {
    format!("{}.{}", tenant_token(tenant), short_hash(key.as_bytes()))
}

/// The hash a [`KeyRecord`] keeps of the request's canonical form.
pub fn request_hash(canonical: &[u8]) -> String {
    short_hash(canonical)
}

/// The first 128 bits of SHA-256, hex: collisions stay out of reach, and a key costs 64 bytes
/// less than with the whole digest (keys are many: one per request for a day).
fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_any_shape_are_one_token_and_tenants_stay_apart() {
        let a = kv_key(Some("acme"), "order 42/confirm.*>");
        assert!(a.starts_with("t_acme."));
        assert_eq!(a.split('.').count(), 2, "{a}");
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_'));
        assert_ne!(a, kv_key(Some("globex"), "order 42/confirm.*>"));
        assert_ne!(a, kv_key(Some("acme"), "order 43/confirm.*>"));
        assert_eq!(a, kv_key(Some("acme"), "order 42/confirm.*>"));
    }
}
