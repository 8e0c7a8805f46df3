//! The `Herald-Signature` header on webhook deliveries.
//!
//! Format: `t=<unix seconds>,v1=<hex HMAC-SHA256>`, where the MAC is computed with the webhook
//! secret over the bytes `<t>.<raw request body>`. A receiver recomputes it, compares in
//! constant time, and rejects timestamps too far from its clock (replays).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const HEADER: &str = "Herald-Signature";

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hex::encode(mac(secret, timestamp, body).finalize().into_bytes()))
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature header is malformed")]
    Malformed,
    #[error("signature timestamp is outside the tolerance")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

/// Verifies a header value against `body`, accepting timestamps within `tolerance_secs` of `now`.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => signatures.push(hex::decode(s).map_err(|_| SignatureError::Malformed)?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - timestamp).abs() > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    if signatures.iter().any(|s| expected.clone().verify_slice(s).is_ok()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let h = sign("k", 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="));
        assert_eq!(verify("k", &h, b"{\"a\":1}", 1_700_000_010, 300), Ok(()));
        assert_eq!(verify("k", &h, b"{\"a\":2}", 1_700_000_010, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify("other", &h, b"{\"a\":1}", 1_700_000_010, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify("k", &h, b"{\"a\":1}", 1_700_001_000, 300), Err(SignatureError::Stale));
        assert_eq!(verify("k", "v1=zz", b"", 0, 300), Err(SignatureError::Malformed));
        assert_eq!(verify("k", "t=1", b"", 1, 300), Err(SignatureError::Malformed));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key="secret", "0.") computed independently with Python's hmac module.
        assert_eq!(
            sign("secret", 0, b""),
            "t=0,v1=3445798a051818ef95def46c2eb62b43d377ce6e3c29b4d0aec3da0e59577f79"
        );
    }
}
