//! The dead-letter core: list, read, replay and discard what HERALD_DLQ holds, one letter or a
//! filtered set at a chosen rate. The HTTP API (`/v1/dlq`), `herald dlq` and `herald console`
//! are three surfaces over this one module.
//!
//! **Replay** decodes the parked intent (a cut payload is fetched whole from HERALD_INTENTS
//! while it is still there), republishes it on its channel's subject under a message id derived
//! from the letter, then deletes the letter. The notification keeps its id, its ledger entry and
//! its history; the worker that takes the new message starts a new round of attempts because the
//! ledger says `dead_lettered` for another message (see [`crate::ledger::decide`]). So a replay
//! never sends what the ledger says was delivered, and replaying a letter twice is harmless:
//! the second finds the letter gone, or (if the first died before deleting it) publishes a copy
//! that the stream's duplicate window or, after it, the ledger turns into no second send.
//!
//! **Discard** deletes the letter. Every replay and discard publishes an [`AuditEvent`] on
//! `herald.audit.dlq.<action>` (HERALD_AUDIT): who, when, which letter, why. The event is
//! stored before the letter is deleted, so a letter never leaves unaccounted for (an action
//! interrupted in between and done again is recorded twice).
//!
//! **Bulk** actions count the letters a [`Filter`] matches up to the DLQ's last sequence when
//! they start, then act on them in sequence order at a steady rate. Each letter acted on leaves
//! the DLQ, so an interrupted bulk action is resumed by running it again with the same filter:
//! it finds exactly what is left.

use std::time::Duration;

use async_nats::{
    HeaderMap,
    header::NATS_MESSAGE_ID,
    jetstream::{
        self,
        message::StreamMessage,
        stream::{self, DirectGetErrorKind},
    },
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    deadletter::{DeadLetter, ErrorClass, Reason, headers as dlq_headers},
    intent::{Channel, Intent},
    ledger::{Entry, Ledger, LedgerKey},
    state::Status,
    topology::{self, DLQ_STREAM, Topology},
};

/// The subject every dead letter is stored under.
const ALL_LETTERS: &str = "herald.dlq.>";
/// How long a scan waits for the next letter before taking the silence as the end (letters
/// deleted while it runs can leave nothing more to come).
const SCAN_QUIET: Duration = Duration::from_secs(2);
/// How many letters one listing call looks at before it answers with a cursor.
pub const MAX_SCAN: usize = 20_000;
/// Most letters one page holds.
pub const MAX_PAGE: usize = 500;
/// Slowest and fastest rates a bulk action accepts, in letters per second.
pub const MIN_RATE: f64 = 0.1;
pub const MAX_RATE: f64 = 10_000.0;

/// Which letters an operator means. Every field narrows; the default matches everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    pub channel: Option<Channel>,
    pub reason: Option<Reason>,
    pub error_class: Option<ErrorClass>,
    /// Only letters of this tenant (the gateway forces it for a token bound to a tenant).
    pub tenant: Option<String>,
    /// Only letters of this notification.
    pub notification_id: Option<String>,
    /// Parked at least this long ago.
    #[serde(default, with = "opt_secs")]
    pub older_than: Option<Duration>,
    /// Parked at most this long ago.
    #[serde(default, with = "opt_secs")]
    pub newer_than: Option<Duration>,
    /// Case-insensitive text the last error contains.
    pub text: Option<String>,
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

impl Filter {
    /// Whether `letter` is one of the letters meant, as of `now`.
    pub fn matches(&self, letter: &Letter, now: DateTime<Utc>) -> bool {
        let age = (now - letter.dead_at).to_std().unwrap_or_default();
        let parked = letter.parked.as_ref();
        self.channel.is_none_or(|c| letter.channel == Some(c))
            && self.reason.is_none_or(|r| parked.is_some_and(|p| p.reason == r))
            && self.error_class.is_none_or(|c| parked.is_some_and(|p| p.error_class == c))
            && self.tenant.as_ref().is_none_or(|t| letter.tenant.as_ref() == Some(t))
            && self.notification_id.as_ref().is_none_or(|id| letter.notification_id.as_ref() == Some(id))
            && self.older_than.is_none_or(|d| age >= d)
            && self.newer_than.is_none_or(|d| age <= d)
            && self.text.as_ref().is_none_or(|t| {
                parked.is_some_and(|p| p.last_error.to_lowercase().contains(&t.to_lowercase()))
            })
    }
}

/// One dead letter as stored in HERALD_DLQ, with what could be read from it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Letter {
    /// Its sequence in HERALD_DLQ: how operators name it.
    pub sequence: u64,
    /// From its subject, `herald.dlq.<channel>`.
    pub channel: Option<Channel>,
    /// When it was parked (`Herald-Dlq-Dead-At`, else when the DLQ stored it).
    pub dead_at: DateTime<Utc>,
    /// Why it was parked; `None` for a message that is not Herald's letter format.
    pub parked: Option<DeadLetter>,
    /// The parked intent's notification id, tenant and correlation id, when it decodes (from
    /// its headers otherwise).
    pub notification_id: Option<String>,
    pub tenant: Option<String>,
    pub correlation_id: Option<String>,
    /// The original message's `Nats-Msg-Id`.
    pub original_msg_id: Option<String>,
    /// Set when only the first bytes of a too-large payload were kept: its whole length.
    pub truncated_from: Option<u64>,
    /// Every header, in order, as stored.
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub payload: Bytes,
    /// Why the payload cannot be replayed as it is, if it cannot.
    pub decode_error: Option<String>,
}

impl Letter {
    /// Reads a message of HERALD_DLQ.
    pub fn from_stream_message(m: &StreamMessage) -> Letter {
        let stored =
            DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond()).unwrap_or_default();
        Letter::from_parts(m.sequence, m.subject.as_str(), &m.headers, m.payload.clone(), stored)
    }

    /// Reads a letter from its parts: sequence, subject, headers, payload and when the DLQ
    /// stored it.
    fn from_parts(
        sequence: u64,
        subject: &str,
        h: &HeaderMap,
        payload: Bytes,
        stored: DateTime<Utc>,
    ) -> Letter {
        let header = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        let channel = subject.strip_prefix("herald.dlq.").and_then(|c| c.parse::<Channel>().ok());
        let parked = DeadLetter::from_headers(h);
        let dead_at = header(dlq_headers::DEAD_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(stored);
        let truncated_from = header(dlq_headers::TRUNCATED_FROM).and_then(|n| n.parse().ok());
        let original_msg_id = header(dlq_headers::ORIGINAL_MSG_ID);
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, values) in h.iter() {
            for v in values {
                headers.push((name.to_string(), v.as_str().to_owned()));
            }
        }
        let mut letter = Letter {
            sequence,
            channel,
            dead_at,
            parked,
            notification_id: header(crate::intent::headers::NOTIFICATION_ID),
            tenant: header(crate::intent::headers::TENANT),
            correlation_id: header(crate::intent::headers::CORRELATION_ID),
            original_msg_id,
            truncated_from,
            headers,
            payload: payload.clone(),
            decode_error: None,
        };
        match letter.intent_from(&payload, h) {
            Ok(intent) => {
                letter.notification_id = Some(intent.id.clone());
                letter.tenant = intent.tenant.clone();
                letter.correlation_id = intent.correlation_id.clone().or(letter.correlation_id);
            }
            Err(e) => letter.decode_error = Some(e),
        }
        letter
    }

    /// Decodes `payload` as this letter's intent, as a worker would.
    fn intent_from(&self, payload: &[u8], headers: &HeaderMap) -> Result<Intent, String> {
        if let Some(n) = self.truncated_from
            && payload.len() as u64 != n
        {
            return Err(format!("only the first {} of {n} bytes were kept", payload.len()));
        }
        let channel = self.channel.ok_or("not on a channel's dead-letter subject")?;
        Intent::from_message(payload, Some(headers), channel, self.original_msg_id.as_deref())
            .map_err(|r| r.to_string())
    }

    /// The parked intent, decoded, as JSON (for people and scripts).
    pub fn intent_json(&self, headers: &HeaderMap) -> Option<serde_json::Value> {
        self.intent_from(&self.payload, headers).ok().and_then(|i| serde_json::to_value(i).ok())
    }

    /// The ledger key of its notification, when that is known.
    pub fn ledger_key(&self) -> Option<LedgerKey> {
        Some(LedgerKey::new(self.tenant.as_deref(), self.notification_id.as_deref()?, self.channel?))
    }
}

/// A letter with everything known about its notification.
#[derive(Debug, Clone, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub letter: Letter,
    /// The parked intent decoded (MessagePack shown as JSON).
    pub intent: Option<serde_json::Value>,
    /// The notification's ledger entry on this channel: attempts over its life, resends, the
    /// latest error and where it stands now.
    pub entry: Option<Entry>,
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub letters: Vec<Letter>,
    /// Pass as `after` to continue; `None` when the end of the DLQ was reached.
    pub next: Option<u64>,
}

/// Who is acting, for the audit trail: a token's subject, or `user@host` at a terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Actor(pub String);

/// What became of a replayed letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replayed {
    /// Republished on its channel with a fresh attempt budget.
    Requeued {
        /// Its new sequence in HERALD_INTENTS.
        intent_sequence: u64,
    },
    /// The ledger says it was delivered after all: nothing republished, the letter removed.
    AlreadyDelivered,
}

/// An operator's action, as kept in HERALD_AUDIT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// `replay`, `discard`, `bulk_replay` or `bulk_discard`.
    pub action: String,
    pub actor: String,
    pub at: DateTime<Utc>,
    /// The letter acted on (single actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What happened: `requeued`, `already_delivered`, `discarded`; for a bulk action `started`
    /// or `finished`.
    pub outcome: String,
    /// The operator's reason (discards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bulk actions: the filter, the rate and how many letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub count: u64,
}

/// What a bulk action has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Letters the filter matched when the action started.
    pub matched: u64,
    /// Letters acted on or skipped so far.
    pub done: u64,
    pub requeued: u64,
    pub already_delivered: u64,
    pub discarded: u64,
    /// Letters that matched but could not be replayed (undecodable, expired, gone); they stay.
    pub skipped: u64,
    /// The sequence of the last letter looked at.
    pub last_sequence: u64,
    pub finished: bool,
    /// Why it stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What was done to one letter of a bulk action.
enum Acted {
    Requeued,
    AlreadyDelivered,
    Discarded,
}

/// A spawned action's result, a panic counting as a failure.
fn flatten(r: Result<Result<Acted, DlqError>, tokio::task::JoinError>) -> Result<Acted, DlqError> {
    r.unwrap_or_else(|e| Err(DlqError::Nats(format!("the action failed: {e}"))))
}

/// How often one letter's action is retried through NATS errors before a bulk action stops.
const BULK_RETRIES: u32 = 4;
/// How many letters of a bulk action are worked on at once.
const BULK_IN_FLIGHT: usize = 32;

/// A bulk action.
#[derive(Debug, Clone, PartialEq)]
pub enum Bulk {
    Replay,
    Discard { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("no dead letter {0}: it may have been replayed or discarded")]
    NotFound(u64),
    #[error("dead letter {0} cannot be replayed: {1}")]
    NotReplayable(u64, String),
    #[error("{0}")]
    Invalid(String),
    #[error("dead-letter queue: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> DlqError {
    DlqError::Nats(e.to_string())
}

/// The dead-letter queue.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    dlq: stream::Stream,
    intents: stream::Stream,
    ledger: Ledger,
}

impl DeadLetters {
    pub fn new(topology: &Topology) -> DeadLetters {
        DeadLetters {
            js: topology.js.clone(),
            dlq: topology.dlq.clone(),
            intents: topology.intents.clone(),
            ledger: topology.ledger.clone(),
        }
    }

    /// How many letters HERALD_DLQ holds, and its last sequence.
    pub async fn totals(&self) -> Result<(u64, u64), DlqError> {
        let info =
            self.js.get_stream(DLQ_STREAM).await.map_err(nats)?.info().await.map_err(nats)?.state.clone();
        Ok((info.messages, info.last_sequence))
    }

    /// Letters after sequence `after` that `filter` matches, oldest first, at most `limit`.
    pub async fn list(&self, filter: &Filter, after: u64, limit: usize) -> Result<Page, DlqError> {
        use futures::TryStreamExt;
        let limit = limit.clamp(1, MAX_PAGE);
        let now = Utc::now();
        let (_, last) = self.totals().await?;
        let mut letters = Vec::new();
        let mut scanned = 0;
        let mut scan = std::pin::pin!(self.scan(after + 1, last));
        while let Some(letter) = scan.try_next().await? {
            let seen = letter.sequence;
            scanned += 1;
            if filter.matches(&letter, now) {
                letters.push(letter);
            }
            if letters.len() == limit || scanned == MAX_SCAN {
                // More may follow unless this was the last one stored.
                let next = (seen < last).then_some(seen);
                return Ok(Page { letters, next });
            }
        }
        Ok(Page { letters, next: None })
    }

    /// Every letter stored from sequence `from` up to `last`, in order, read with an ordered
    /// consumer (letters arrive in batches, not one request each).
    fn scan(&self, from: u64, last: u64) -> impl futures::Stream<Item = Result<Letter, DlqError>> + '_ {
        use jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        enum Scan {
            Start,
            Running(Box<jetstream::consumer::pull::Ordered>),
            Done,
        }
        futures::stream::try_unfold(Scan::Start, move |state| async move {
            let mut messages = match state {
                Scan::Done => return Ok(None),
                Scan::Start if from > last => return Ok(None),
                Scan::Running(m) => *m,
                Scan::Start => {
                    let consumer = self
                        .dlq
                        .create_consumer(OrderedConfig {
                            filter_subject: ALL_LETTERS.into(),
                            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                            ..Default::default()
                        })
                        .await
                        .map_err(nats)?;
                    consumer.messages().await.map_err(nats)?
                }
            };
            // Letters deleted while the scan runs can leave nothing more to deliver before
            // `last`: a quiet spell means the end.
            let next = tokio::time::timeout(SCAN_QUIET, futures::StreamExt::next(&mut messages)).await;
            let m = match next {
                Err(_) | Ok(None) => return Ok(None),
                Ok(Some(m)) => m.map_err(nats)?,
            };
            let info = m.info().map_err(nats)?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            if sequence > last {
                return Ok(None);
            }
            let stored =
                DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond())
                    .unwrap_or_default();
            let headers = m.headers.clone().unwrap_or_default();
            let letter =
                Letter::from_parts(sequence, m.subject.as_str(), &headers, m.payload.clone(), stored);
            // Nothing pending after this one: end now rather than wait out the quiet spell.
            let rest =
                if pending > 0 && sequence < last { Scan::Running(Box::new(messages)) } else { Scan::Done };
            Ok(Some((letter, rest)))
        })
    }

    /// One letter, or `None` when there is none at `sequence`.
    pub async fn get(&self, sequence: u64) -> Result<Option<Letter>, DlqError> {
        match self.dlq.direct_get(sequence).await {
            Ok(m) => Ok(Some(Letter::from_stream_message(&m))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// One letter with its decoded intent and ledger entry.
    pub async fn detail(&self, sequence: u64) -> Result<Option<Detail>, DlqError> {
        let Some(m) = self.raw(sequence).await? else { return Ok(None) };
        let letter = Letter::from_stream_message(&m);
        let intent = letter.intent_json(&m.headers);
        let entry = match letter.ledger_key() {
            Some(key) => self.ledger.read(&key).await.map_err(nats)?.0,
            None => None,
        };
        Ok(Some(Detail { letter, intent, entry }))
    }

    async fn raw(&self, sequence: u64) -> Result<Option<StreamMessage>, DlqError> {
        match self.dlq.direct_get(sequence).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Replays letter `sequence`: republishes its intent with a fresh attempt budget (unless
    /// the ledger says it was delivered), then removes the letter.
    pub async fn replay(&self, sequence: u64, actor: &Actor) -> Result<Replayed, DlqError> {
        let m = self.raw(sequence).await?.ok_or(DlqError::NotFound(sequence))?;
        let letter = Letter::from_stream_message(&m);
        let intent = self.replayable(&letter, &m).await?;
        let key = LedgerKey::of(&intent);
        let (entry, _) = self.ledger.read(&key).await.map_err(nats)?;
        let outcome = if entry.as_ref().is_some_and(|e| e.status == Status::Delivered) {
            Replayed::AlreadyDelivered
        } else {
            let mut headers = intent.headers();
            // One id per letter: two replays of it inside the duplicate window store one message.
            headers.insert(NATS_MESSAGE_ID, format!("replay:{}:{sequence}", key.kv_key()).as_str());
            let ack = self
                .js
                .publish_with_headers(topology::subject_of(&intent), headers, intent.encode().into())
                .await
                .map_err(nats)?
                .await
                .map_err(nats)?;
            Replayed::Requeued { intent_sequence: ack.sequence }
        };
        let outcome_name = match outcome {
            Replayed::Requeued { .. } => "requeued",
            Replayed::AlreadyDelivered => "already_delivered",
        };
        self.audit(AuditEvent {
            action: "replay".into(),
            actor: actor.0.clone(),
            at: Utc::now(),
            dlq_sequence: Some(sequence),
            notification_id: Some(intent.id.clone()),
            channel: Some(intent.channel()),
            tenant: intent.tenant.clone(),
            outcome: outcome_name.into(),
            reason: None,
            filter: None,
            rate: None,
            count: 1,
        })
        .await?;
        // Audited before the letter goes: a crash in between leaves the letter, and doing it
        // again records it again, so no letter leaves the queue unaccounted for.
        self.remove(sequence).await?;
        tracing::info!(dlq_sequence = sequence, notification_id = %intent.id, actor = %actor.0, outcome = outcome_name, "dead letter replayed");
        Ok(outcome)
    }

    /// The intent a letter can be replayed as, or why it cannot be.
    async fn replayable(&self, letter: &Letter, m: &StreamMessage) -> Result<Intent, DlqError> {
        let refuse = |why: String| DlqError::NotReplayable(letter.sequence, why);
        let Some(parked) = &letter.parked else {
            return Err(refuse("it is not in Herald's dead-letter format".into()));
        };
        if matches!(parked.reason, Reason::Undecodable | Reason::Invalid) {
            return Err(refuse(format!(
                "it was parked as {}; a replay would be parked again (discard it)",
                parked.reason.as_str()
            )));
        }
        let intent = match letter.intent_from(&m.payload, &m.headers) {
            Ok(intent) => intent,
            Err(_) if letter.truncated_from.is_some() => {
                // Only its first bytes were parked: the original may still be in HERALD_INTENTS.
                let original = self.intents.get_raw_message(parked.original_sequence).await.map_err(|e| {
                    refuse(format!("only part of it was parked and the original is gone ({e})"))
                })?;
                if original.subject.as_str() != parked.original_subject {
                    return Err(refuse("only part of it was parked and the original is gone".into()));
                }
                letter.intent_from(&original.payload, &original.headers).map_err(refuse)?
            }
            Err(e) => return Err(refuse(e)),
        };
        if intent.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(refuse("its expires_at has passed".into()));
        }
        Ok(intent)
    }

    /// Discards letter `sequence`, keeping `reason` in the audit trail.
    pub async fn discard(&self, sequence: u64, actor: &Actor, reason: &str) -> Result<(), DlqError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(DlqError::Invalid("a discard needs a reason".into()));
        }
        let letter = self.get(sequence).await?.ok_or(DlqError::NotFound(sequence))?;
        self.audit(AuditEvent {
            action: "discard".into(),
            actor: actor.0.clone(),
            at: Utc::now(),
            dlq_sequence: Some(sequence),
            notification_id: letter.notification_id.clone(),
            channel: letter.channel,
            tenant: letter.tenant.clone(),
            outcome: "discarded".into(),
            reason: Some(reason.to_owned()),
            filter: None,
            rate: None,
            count: 1,
        })
        .await?;
        self.remove(sequence).await?;
        tracing::info!(dlq_sequence = sequence, actor = %actor.0, reason, "dead letter discarded");
        Ok(())
    }

    /// Deletes a letter; one already gone (a racing replay) is fine.
    async fn remove(&self, sequence: u64) -> Result<(), DlqError> {
        match self.dlq.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("no message found") => Ok(()),
            Err(e) => Err(nats(e)),
        }
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), DlqError> {
        let payload = serde_json::to_vec(&event).expect("audit events serialize");
        self.js
            .publish(topology::audit_subject(&event.action), payload.into())
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// How many letters `filter` matches now, and the DLQ's last sequence (the bound a bulk
    /// action started now works up to).
    pub async fn count(&self, filter: &Filter) -> Result<(u64, u64), DlqError> {
        use futures::TryStreamExt;
        let (_, last) = self.totals().await?;
        let now = Utc::now();
        let matched = self
            .scan(1, last)
            .try_fold(0, |n, letter| futures::future::ready(Ok(n + u64::from(filter.matches(&letter, now)))))
            .await?;
        Ok((matched, last))
    }

    /// Replays or discards every letter `filter` matches, at most `rate` per second, calling
    /// `report` after each. Stops early (and says so in the progress) when `stop` turns true or
    /// NATS fails; running it again with the same filter resumes.
    pub async fn bulk(
        &self,
        filter: &Filter,
        action: &Bulk,
        rate: f64,
        actor: &Actor,
        mut report: impl FnMut(&Progress),
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Progress, DlqError> {
        if !(MIN_RATE..=MAX_RATE).contains(&rate) {
            return Err(DlqError::Invalid(format!(
                "rate must be between {MIN_RATE} and {MAX_RATE} per second"
            )));
        }
        if let Bulk::Discard { reason } = action
            && reason.trim().is_empty()
        {
            return Err(DlqError::Invalid("a discard needs a reason".into()));
        }
        let (matched, last) = self.count(filter).await?;
        let name = match action {
            Bulk::Replay => "bulk_replay",
            Bulk::Discard { .. } => "bulk_discard",
        };
        let mut progress = Progress { matched, ..Progress::default() };
        self.audit_bulk(name, actor, "started", filter, rate, action, matched).await?;
        report(&progress);
        let start = tokio::time::Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate);
        // Each letter takes a few round trips to NATS; several run at once so that the rate,
        // not the latency, sets the pace.
        let mut running = futures::stream::FuturesUnordered::new();
        let mut started: u64 = 0;
        let mut scan = std::pin::pin!(self.scan(1, last));
        let mut failure: Option<String> = None;
        let mut count =
            |progress: &mut Progress, acted: Result<Acted, DlqError>, failure: &mut Option<String>| {
                match acted {
                    Ok(Acted::Requeued) => progress.requeued += 1,
                    Ok(Acted::AlreadyDelivered) => progress.already_delivered += 1,
                    Ok(Acted::Discarded) => progress.discarded += 1,
                    Err(DlqError::NotFound(_) | DlqError::NotReplayable(..)) => progress.skipped += 1,
                    Err(e) => {
                        failure.get_or_insert(e.to_string());
                        return;
                    }
                }
                progress.done += 1;
                report(progress);
            };
        loop {
            if *stop.borrow() {
                failure.get_or_insert("stopped".to_owned());
            }
            if failure.is_some() {
                break;
            }
            let letter = match futures::TryStreamExt::try_next(&mut scan).await {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            };
            progress.last_sequence = letter.sequence;
            if !filter.matches(&letter, Utc::now()) {
                continue;
            }
            // A steady pace: letter n starts at start + n / rate, whatever each one took.
            let due = start + interval.mul_f64(started as f64);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    Some(done) = futures::StreamExt::next(&mut running) => {
                        count(&mut progress, flatten(done), &mut failure);
                    }
                }
            }
            while running.len() >= BULK_IN_FLIGHT {
                if let Some(done) = futures::StreamExt::next(&mut running).await {
                    count(&mut progress, flatten(done), &mut failure);
                }
            }
            let (dlq, actor, action, seq) = (self.clone(), actor.clone(), action.clone(), letter.sequence);
            running.push(tokio::spawn(async move {
                // A slow or briefly unreachable NATS is retried a few times before the whole
                // action stops: each step is safe to repeat (the republish keeps its message id,
                // a letter already gone is reported as such).
                let mut tries = 0;
                loop {
                    let acted = match &action {
                        Bulk::Replay => dlq.replay(seq, &actor).await.map(|r| match r {
                            Replayed::Requeued { .. } => Acted::Requeued,
                            Replayed::AlreadyDelivered => Acted::AlreadyDelivered,
                        }),
                        Bulk::Discard { reason } => {
                            dlq.discard(seq, &actor, reason).await.map(|()| Acted::Discarded)
                        }
                    };
                    match acted {
                        Err(DlqError::Nats(e)) if tries < BULK_RETRIES => {
                            tries += 1;
                            tracing::warn!(dlq_sequence = seq, error = %e, "retrying a dead-letter action");
                            tokio::time::sleep(Duration::from_millis(250) * tries).await;
                        }
                        other => return other,
                    }
                }
            }));
            started += 1;
        }
        while let Some(done) = futures::StreamExt::next(&mut running).await {
            count(&mut progress, flatten(done), &mut failure);
        }
        let result = match failure {
            Some(e) => Err(e),
            None => Ok(()),
        };
        progress.finished = result.is_ok();
        progress.error = result.err();
        let done = progress.done;
        let outcome = if progress.finished { "finished" } else { "interrupted" };
        // The letters were each audited already; a lost summary is only logged.
        if let Err(e) = self.audit_bulk(name, actor, outcome, filter, rate, action, done).await {
            tracing::warn!(error = %e, "could not record the end of the bulk action");
        }
        report(&progress);
        Ok(progress)
    }

    #[allow(clippy::too_many_arguments, reason = "one audit record's fields")]
    async fn audit_bulk(
        &self,
        name: &str,
        actor: &Actor,
        outcome: &str,
        filter: &Filter,
        rate: f64,
        action: &Bulk,
        count: u64,
    ) -> Result<(), DlqError> {
        self.audit(AuditEvent {
            action: name.into(),
            actor: actor.0.clone(),
            at: Utc::now(),
            dlq_sequence: None,
            notification_id: None,
            channel: filter.channel,
            tenant: filter.tenant.clone(),
            outcome: outcome.into(),
            reason: match action {
                Bulk::Discard { reason } => Some(reason.clone()),
                Bulk::Replay => None,
            },
            filter: Some(filter.clone()),
            rate: Some(rate),
            count,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(channel: Channel, reason: Reason, error: &str, tenant: Option<&str>, age_secs: i64) -> Letter {
        Letter {
            sequence: 1,
            channel: Some(channel),
            dead_at: Utc::now() - chrono::Duration::seconds(age_secs),
            parked: Some(DeadLetter {
                reason,
                error_class: if reason == Reason::Rejected {
                    ErrorClass::Permanent
                } else {
                    ErrorClass::Transient
                },
                attempts: 3,
                last_error: error.into(),
                original_subject: format!("herald.intent.{channel}"),
                original_sequence: 9,
            }),
            notification_id: Some("n1".into()),
            tenant: tenant.map(str::to_owned),
            correlation_id: None,
            original_msg_id: None,
            truncated_from: None,
            headers: vec![],
            payload: Bytes::new(),
            decode_error: None,
        }
    }

    #[test]
    fn filters_narrow_by_every_field() {
        let l = letter(Channel::Webhook, Reason::Rejected, "HTTP 410 Gone", Some("acme"), 3600);
        let now = Utc::now();
        let check = |f: Filter, expected: bool| assert_eq!(f.matches(&l, now), expected, "{f:?}");
        check(Filter::default(), true);
        check(Filter { channel: Some(Channel::Webhook), ..Default::default() }, true);
        check(Filter { channel: Some(Channel::Email), ..Default::default() }, false);
        check(Filter { reason: Some(Reason::Rejected), ..Default::default() }, true);
        check(Filter { reason: Some(Reason::AttemptsExhausted), ..Default::default() }, false);
        check(Filter { error_class: Some(ErrorClass::Permanent), ..Default::default() }, true);
        check(Filter { error_class: Some(ErrorClass::Transient), ..Default::default() }, false);
        check(Filter { tenant: Some("acme".into()), ..Default::default() }, true);
        check(Filter { tenant: Some("globex".into()), ..Default::default() }, false);
        check(Filter { notification_id: Some("n1".into()), ..Default::default() }, true);
        check(Filter { notification_id: Some("n2".into()), ..Default::default() }, false);
        check(Filter { older_than: Some(Duration::from_secs(600)), ..Default::default() }, true);
        check(Filter { older_than: Some(Duration::from_secs(7200)), ..Default::default() }, false);
        check(Filter { newer_than: Some(Duration::from_secs(7200)), ..Default::default() }, true);
        check(Filter { newer_than: Some(Duration::from_secs(600)), ..Default::default() }, false);
        check(Filter { text: Some("410 gone".into()), ..Default::default() }, true);
        check(Filter { text: Some("timeout".into()), ..Default::default() }, false);
        let untenanted = letter(Channel::Webhook, Reason::Rejected, "x", None, 1);
        assert!(!Filter { tenant: Some("acme".into()), ..Default::default() }.matches(&untenanted, now));
    }

    #[test]
    fn filters_round_trip_as_json_with_ages_in_seconds() {
        let f = Filter {
            channel: Some(Channel::Webhook),
            reason: Some(Reason::AttemptsExhausted),
            older_than: Some(Duration::from_secs(90)),
            ..Default::default()
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["older_than"], 90);
        assert_eq!(json["reason"], "attempts_exhausted");
        assert_eq!(serde_json::from_value::<Filter>(json).unwrap(), f);
    }
}
