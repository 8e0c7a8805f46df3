//! The format of a dead letter in HERALD_DLQ.
//!
//! A dead letter is the original message, payload untouched (even when it could not be
//! decoded), with the original headers and these added: why it was parked, what kind of error
//! it was, how many attempts were made, the last error, and where it came from. Its
//! `Nats-Msg-Id` is `dlq-<stream>-<sequence>`, so parking the same message twice (a worker and
//! the advisory mover racing) stores it once.

use async_nats::HeaderMap;

pub mod headers {
    pub const REASON: &str = "Herald-Dlq-Reason";
    pub const ERROR_CLASS: &str = "Herald-Dlq-Error-Class";
    pub const ATTEMPTS: &str = "Herald-Dlq-Attempts";
    pub const LAST_ERROR: &str = "Herald-Dlq-Last-Error";
    pub const ORIGINAL_SUBJECT: &str = "Herald-Dlq-Original-Subject";
    pub const ORIGINAL_SEQUENCE: &str = "Herald-Dlq-Original-Sequence";
    pub const DEAD_AT: &str = "Herald-Dlq-Dead-At";
    /// The original message's `Nats-Msg-Id` (its idempotency key), kept for a replay.
    pub const ORIGINAL_MSG_ID: &str = "Herald-Dlq-Original-Msg-Id";
    /// Set when the payload is not the whole original: its length in bytes. Only a message too
    /// large to park whole (near the server's max payload) is cut, to [`super::TRUNCATED_BYTES`].
    pub const TRUNCATED_FROM: &str = "Herald-Dlq-Truncated-From";
}

/// How much of a payload too large to park whole is kept.
pub const TRUNCATED_BYTES: usize = 4096;

/// Why a message was parked. The string forms are stable: operators filter on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not MessagePack or JSON of the intent's shape.
    Undecodable,
    /// Decoded, but a field is wrong.
    Invalid,
    /// `expires_at` passed before it could be delivered.
    Expired,
    /// The provider refused it for good (a 4xx other than 408/429).
    Rejected,
    /// Every attempt failed transiently.
    AttemptsExhausted,
    /// The server gave up redelivering it (a worker died holding it on its last attempt).
    MaxDeliveries,
    /// A worker started sending it and died before recording the outcome: the receiver may or
    /// may not have it. Parked instead of resent under `HERALD_UNCERTAIN=park`, and always when
    /// that was the last attempt.
    Uncertain,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Undecodable => "undecodable",
            Reason::Invalid => "invalid",
            Reason::Expired => "expired",
            Reason::Rejected => "rejected",
            Reason::AttemptsExhausted => "attempts_exhausted",
            Reason::MaxDeliveries => "max_deliveries",
            Reason::Uncertain => "uncertain",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        [
            Reason::Undecodable,
            Reason::Invalid,
            Reason::Expired,
            Reason::Rejected,
            Reason::AttemptsExhausted,
            Reason::MaxDeliveries,
            Reason::Uncertain,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What kind of failure the last error was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retrying could have helped (timeouts, 5xx, 429), but attempts ran out.
    Transient,
    /// Retrying cannot help.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Everything a dead letter says about why it is there.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub reason: Reason,
    pub error_class: ErrorClass,
    pub attempts: u32,
    pub last_error: String,
    pub original_subject: String,
    pub original_sequence: u64,
}

impl DeadLetter {
    /// The `Nats-Msg-Id` of this dead letter.
    pub fn message_id(&self, stream: &str) -> String {
        format!("dlq-{stream}-{}", self.original_sequence)
    }

    /// The original headers (minus its `Nats-Msg-Id` and server-set ones) plus this letter's.
    pub fn headers(&self, original: Option<&HeaderMap>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(original) = original {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    if let Some(id) = values.first() {
                        h.insert(headers::ORIGINAL_MSG_ID, id.as_str());
                    }
                    continue;
                }
                // Server-set and scheduling headers would act again on the DLQ stream.
                if name.starts_with("Nats-") {
                    continue;
                }
                for v in values {
                    h.append(name, v.as_str());
                }
            }
        }
        h.insert(headers::REASON, self.reason.as_str());
        h.insert(headers::ERROR_CLASS, self.error_class.as_str());
        h.insert(headers::ATTEMPTS, self.attempts.to_string().as_str());
        h.insert(headers::LAST_ERROR, header_safe(&self.last_error).as_str());
        h.insert(headers::ORIGINAL_SUBJECT, self.original_subject.as_str());
        h.insert(headers::ORIGINAL_SEQUENCE, self.original_sequence.to_string().as_str());
        h.insert(headers::DEAD_AT, chrono::Utc::now().to_rfc3339().as_str());
        h
    }

    /// Reads a dead letter's headers back; `None` if they are not Herald's.
    pub fn from_headers(h: &HeaderMap) -> Option<DeadLetter> {
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        Some(DeadLetter {
            reason: Reason::parse(&get(headers::REASON)?)?,
            error_class: match get(headers::ERROR_CLASS)?.as_str() {
                "transient" => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            attempts: get(headers::ATTEMPTS)?.parse().ok()?,
            last_error: get(headers::LAST_ERROR).unwrap_or_default(),
            original_subject: get(headers::ORIGINAL_SUBJECT)?,
            original_sequence: get(headers::ORIGINAL_SEQUENCE)?.parse().ok()?,
        })
    }
}

/// Header values are one line of printable text; errors can carry anything.
fn header_safe(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(512).collect();
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_keep_the_original_ones() {
        let dl = DeadLetter {
            reason: Reason::Rejected,
            error_class: ErrorClass::Permanent,
            attempts: 2,
            last_error: "400 Bad Request:\r\nno such user".into(),
            original_subject: "herald.intent.webhook".into(),
            original_sequence: 17,
        };
        let mut original = HeaderMap::new();
        original.insert("Nats-Msg-Id", "k1");
        original.insert("Herald-Correlation-Id", "c1");
        let h = dl.headers(Some(&original));
        assert!(h.get("Nats-Msg-Id").is_none());
        assert_eq!(h.get(headers::ORIGINAL_MSG_ID).unwrap().as_str(), "k1");
        assert_eq!(h.get("Herald-Correlation-Id").unwrap().as_str(), "c1");
        assert_eq!(h.get(headers::LAST_ERROR).unwrap().as_str(), "400 Bad Request:  no such user");
        let back = DeadLetter::from_headers(&h).unwrap();
        assert_eq!(back, DeadLetter { last_error: "400 Bad Request:  no such user".into(), ..dl.clone() });
        assert_eq!(dl.message_id("HERALD_INTENTS"), "dlq-HERALD_INTENTS-17");
    }
}
