//! The delivery ledger: what happened to each notification on each channel, claimed before a
//! send and settled after it.
//!
//! One key per (tenant, notification, channel) in the `herald_notifications` bucket,
//! `<tenant token>.<id>.<channel>` (see [`LedgerKey`]). The gateway creates it (`accepted` or
//! `scheduled`) once the intent is stored; a worker **claims** it with a compare-and-set before
//! sending (status `sending`, naming the worker and until when the claim holds), and **settles**
//! it with a compare-and-set on the claim's revision afterwards. Every write is a
//! compare-and-set on the revision that was read, so of two handlers of the same notification
//! exactly one claims it; the other sees a live claim and waits.
//!
//! What each handler does is decided by [`decide`], a pure function of the entry it read, and
//! what a late write may change is decided by [`merge`]: `delivered` is final (nothing
//! overwrites it), a dead letter is only left for a new message (a DLQ replay), and a handler
//! whose claim was taken over never overwrites the new owner's claim.
//!
//! A claim whose time ran out with no outcome recorded means its worker died (or stalled) between
//! starting a send and recording it: the receiver may or may not have the notification. Such a
//! notification is *uncertain*, and `HERALD_UNCERTAIN` decides per channel whether it is sent
//! again or parked in the DLQ as `uncertain`.
//!
//! Every settled attempt also publishes a [`StatusEvent`], with a message id so a retried
//! publish is stored once.

use std::{collections::BTreeMap, time::Duration};

use async_nats::{
    HeaderMap,
    header::NATS_MESSAGE_ID,
    jetstream::{self, kv},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    config::UncertainPolicy,
    deadletter::{ErrorClass, Reason},
    intent::{Channel, Intent},
    state::{ChannelState, NotificationRecord, Outcome, StateError, Status, StatusEvent},
    topology,
};

/// Where one notification's state on one channel is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerKey {
    /// The tenant that sent it: ids are only unique within a tenant.
    pub tenant: Option<String>,
    /// The notification id.
    pub id: String,
    pub channel: Channel,
}

impl LedgerKey {
    pub fn new(tenant: Option<&str>, id: &str, channel: Channel) -> LedgerKey {
        LedgerKey { tenant: tenant.map(str::to_owned), id: id.to_owned(), channel }
    }

    pub fn of(intent: &Intent) -> LedgerKey {
        LedgerKey::new(intent.tenant.as_deref(), &intent.id, intent.channel())
    }

    /// `<tenant token>.<id>.<channel>`.
    pub fn kv_key(&self) -> String {
        format!("{}.{}.{}", tenant_token(self.tenant.as_deref()), self.id, self.channel)
    }
}

/// A tenant as one KV key token: `t_<tenant>` when the tenant is made of letters, digits, `-`
/// and `_`; `x_<hex of its bytes>` otherwise; `none` for intents published without a tenant.
/// The prefixes keep the three forms apart.
pub fn tenant_token(tenant: Option<&str>) -> String {
    match tenant {
        None => "none".into(),
        Some(t) if t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {
            format!("t_{t}")
        }
        Some(t) => format!("x_{}", hex::encode(t)),
    }
}

/// A worker's hold on a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Which process claimed it: `<pid>#<random>`, unique per process start.
    pub owner: String,
    /// The HERALD_INTENTS sequence of the message being handled.
    pub sequence: u64,
    /// When the claim lapses if its owner has not settled it. A live owner settles well before.
    pub until: DateTime<Utc>,
}

/// Why a notification is (being) dead-lettered, and whether its DLQ copy is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parking {
    pub reason: Reason,
    pub error_class: ErrorClass,
    /// The last error, as the dead letter's `Herald-Dlq-Last-Error` says it.
    pub error: String,
    /// True once HERALD_DLQ acknowledged the copy. Until then a redelivery parks it again
    /// (the copy's message id makes that idempotent) instead of sending it.
    pub confirmed: bool,
}

/// One notification on one channel, as the ledger stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub status: Status,
    /// Sends started on this channel over the notification's life (claims taken).
    pub attempts: u32,
    /// Sends started for the current round: a DLQ replay starts a new round with a fresh
    /// attempt budget, keeping `attempts` as history.
    #[serde(default)]
    pub round_attempts: u32,
    /// Sends repeated because an earlier one's outcome was never recorded (`HERALD_UNCERTAIN=resend`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resends: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// When the next attempt is due (status `retrying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// Why it was suppressed, deferred or skipped, or which channel it stood in for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The end of the quiet hours a deferred notification waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_until: Option<DateTime<Utc>>,
    /// The provider calls of the latest attempt that made any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<crate::state::ProviderCall>,
    /// Present while a worker is sending (status `sending`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// Present once the notification is dead-lettered (status `dead_lettered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parking: Option<Parking>,
    /// HERALD_INTENTS sequence of the message the latest attempt handled: tells a redelivery of
    /// a dead-lettered message (terminate it) from a replay of the notification (deliver it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Entry {
    /// The entry the gateway writes for an intent it stored.
    pub fn accepted(intent: &Intent, now: DateTime<Utc>) -> Entry {
        let status =
            if intent.send_at.is_some_and(|t| t > now) { Status::Scheduled } else { Status::Accepted };
        Entry {
            status,
            attempts: 0,
            round_attempts: 0,
            resends: 0,
            last_error: None,
            updated_at: now,
            delivered_at: None,
            retry_at: None,
            note: None,
            deferred_until: None,
            calls: Vec::new(),
            claim: None,
            parking: None,
            sequence: None,
            correlation_id: intent.correlation_id.clone(),
            tenant: intent.tenant.clone(),
            created_at: intent.created_at.unwrap_or(now),
        }
    }

    /// What `GET /v1/notifications/{id}` shows of it.
    pub fn state(&self) -> ChannelState {
        ChannelState {
            status: self.status,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            updated_at: self.updated_at,
            delivered_at: self.delivered_at,
            note: self.note.clone(),
            deferred_until: self.deferred_until,
            calls: self.calls.clone(),
        }
    }
}

/// What a handler of a message should do, given the ledger entry it read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Claim it and send. `takeover`: an earlier claim lapsed with no outcome (uncertain).
    /// `new_round`: the notification was dead-lettered and this is a new message for it.
    /// `reclaim`: the claim is this process's own, written by a `begin` whose answer was lost,
    /// so nothing was sent under it and it is no new attempt.
    Send { takeover: bool, new_round: bool, reclaim: bool },
    /// Delivered already: acknowledge without sending.
    Delivered,
    /// Decided already without a send (suppressed, skipped, or this very message deferred):
    /// acknowledge.
    Decided(Status),
    /// This very message is in the DLQ: terminate it.
    InDlq,
    /// Dead-letter it without sending (claiming it for that first).
    Park { reason: Reason, error_class: ErrorClass, error: String },
    /// Another worker's claim is live: try again after this long.
    Busy(Duration),
}

/// What the handler of message `sequence` may do. `final_delivery`: the server will not deliver
/// this message again (the dead-letter mover asks), so there is nothing left but to park it.
/// `expired`: the intent's `expires_at` has passed. `own_idle`: the claim found, if any, is
/// this process's and the message it names is not being handled here now — its `begin` wrote it
/// but never heard back, so nothing was sent under it.
#[allow(clippy::too_many_arguments, reason = "each is one fact the decision rests on")]
pub fn decide(
    current: Option<&Entry>,
    sequence: u64,
    now: DateTime<Utc>,
    max_attempts: u32,
    policy: UncertainPolicy,
    expired: bool,
    final_delivery: bool,
    own_idle: bool,
) -> Decision {
    let park =
        |reason, error_class, error: &str| Decision::Park { reason, error_class, error: error.to_owned() };
    let Some(e) = current else {
        return if expired {
            park(Reason::Expired, ErrorClass::Permanent, EXPIRED)
        } else if final_delivery {
            park(Reason::MaxDeliveries, ErrorClass::Transient, NO_ATTEMPT_FINISHED)
        } else {
            Decision::Send { takeover: false, new_round: false, reclaim: false }
        };
    };
    match e.status {
        Status::Delivered => return Decision::Delivered,
        s @ (Status::Suppressed | Status::Skipped | Status::Throttled) => return Decision::Decided(s),
        // The scheduled copy of a deferred message is a new message; a redelivery of the one
        // that was deferred has nothing left to do.
        Status::Deferred if e.sequence == Some(sequence) => return Decision::Decided(Status::Deferred),
        Status::DeadLettered if e.sequence == Some(sequence) => {
            return match &e.parking {
                Some(p) if !p.confirmed => park(p.reason, p.error_class, &p.error),
                _ => Decision::InDlq,
            };
        }
        _ => {}
    }
    let new_round = e.status == Status::DeadLettered;
    let round_attempts = if new_round { 0 } else { e.round_attempts };
    if let Some(claim) = &e.claim {
        if own_idle && !final_delivery && !expired {
            return Decision::Send { takeover: false, new_round, reclaim: true };
        }
        if claim.until > now {
            let left = (claim.until - now).to_std().unwrap_or_default();
            return Decision::Busy(left);
        }
        // The claim lapsed with no outcome: the receiver may or may not have it.
        if final_delivery || round_attempts >= max_attempts {
            return park(Reason::Uncertain, ErrorClass::Transient, UNCERTAIN_LAST);
        }
        if policy == UncertainPolicy::Park {
            return park(Reason::Uncertain, ErrorClass::Transient, UNCERTAIN_PARKED);
        }
        if expired {
            return park(Reason::Expired, ErrorClass::Permanent, EXPIRED);
        }
        return Decision::Send { takeover: true, new_round, reclaim: false };
    }
    if expired {
        return park(Reason::Expired, ErrorClass::Permanent, EXPIRED);
    }
    if final_delivery {
        return park(Reason::MaxDeliveries, ErrorClass::Transient, NO_ATTEMPT_FINISHED);
    }
    if round_attempts >= max_attempts {
        let error = e.last_error.as_deref().unwrap_or("every attempt failed");
        return park(Reason::AttemptsExhausted, ErrorClass::Transient, error);
    }
    Decision::Send { takeover: false, new_round, reclaim: false }
}

const EXPIRED: &str = "expires_at passed before delivery";
const NO_ATTEMPT_FINISHED: &str = "no worker finished the last attempt (ack wait expired)";
const UNCERTAIN_LAST: &str =
    "the worker sending the last attempt died before recording its outcome; the receiver may have it";
const UNCERTAIN_PARKED: &str = "the worker sending it died before recording the outcome; the receiver may have it \
     (HERALD_UNCERTAIN=park: not resent)";

/// How a held delivery ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// The provider accepted it.
    Delivered,
    /// A transient failure; another attempt follows at `retry_at`.
    Retrying { error: String, retry_at: DateTime<Utc> },
    /// No provider was called (every one's circuit breaker was open): the claim is given back
    /// without counting an attempt, and the delivery waits until `retry_at` (status
    /// `retrying`).
    Waiting { error: String, retry_at: DateTime<Utc> },
    /// It is to be dead-lettered; the DLQ copy is not stored yet.
    Parking { reason: Reason, error_class: ErrorClass, error: String },
    /// The DLQ copy is stored.
    Parked,
    /// Not sent: the user opted out; `rule` says which rule decided.
    Suppressed { rule: String },
    /// Over the recipient's limit: not sent, recorded with the limit.
    Throttled { limit: String },
    /// Not sent yet: a copy is scheduled for `until` (the end of quiet hours).
    Deferred { until: DateTime<Utc>, why: String },
    /// Not sent: nothing to send it to; `reason` says why (and which channel took over).
    Skipped { reason: String },
}

/// What a late write may do to the entry it finds.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// Write this.
    Write(Box<Entry>),
    /// Leave the entry alone: it already says something that must stand.
    Keep(Status),
}

/// Applies `outcome` of the attempt `held_claim` to `current`, which may have changed since the
/// claim was written. Delivered is final; a delivery always lands; a claim taken over by
/// another handler stays theirs; a dead letter is not turned back into a retry.
pub fn merge(current: &Entry, held_claim: Option<&Claim>, outcome: &Settle, now: DateTime<Utc>) -> Merge {
    if current.status.is_final() {
        return Merge::Keep(current.status);
    }
    let ours = |c: &Claim| held_claim.is_some_and(|h| h.owner == c.owner && h.sequence == c.sequence);
    if *outcome != Settle::Delivered {
        if current.claim.as_ref().is_some_and(|c| !ours(c)) {
            return Merge::Keep(current.status);
        }
        if current.status == Status::DeadLettered
            && matches!(outcome, Settle::Retrying { .. } | Settle::Waiting { .. })
        {
            return Merge::Keep(Status::DeadLettered);
        }
    }
    let mut e = current.clone();
    e.updated_at = now;
    e.claim = None;
    e.retry_at = None;
    if let Some(c) = held_claim {
        e.sequence = Some(c.sequence);
    }
    match outcome {
        Settle::Delivered => {
            e.status = Status::Delivered;
            e.delivered_at = Some(now);
            e.parking = None;
        }
        Settle::Retrying { error, retry_at } => {
            e.status = Status::Retrying;
            e.last_error = Some(error.clone());
            e.retry_at = Some(*retry_at);
        }
        Settle::Waiting { error, retry_at } => {
            e.status = Status::Retrying;
            e.last_error = Some(error.clone());
            e.retry_at = Some(*retry_at);
            // The claim counted an attempt that never reached a provider.
            if held_claim.is_some() {
                e.attempts = e.attempts.saturating_sub(1);
                e.round_attempts = e.round_attempts.saturating_sub(1);
            }
        }
        Settle::Parking { reason, error_class, error } => {
            e.status = Status::DeadLettered;
            e.last_error = Some(format!("{}: {error}", reason.as_str()));
            e.parking = Some(Parking {
                reason: *reason,
                error_class: *error_class,
                error: error.clone(),
                confirmed: false,
            });
        }
        Settle::Parked => {
            e.status = Status::DeadLettered;
            if let Some(p) = e.parking.as_mut() {
                p.confirmed = true;
            }
        }
        Settle::Suppressed { rule } => {
            e.status = Status::Suppressed;
            e.note = Some(rule.clone());
        }
        Settle::Throttled { limit } => {
            e.status = Status::Throttled;
            e.note = Some(limit.clone());
        }
        Settle::Deferred { until, why } => {
            e.status = Status::Deferred;
            e.note = Some(why.clone());
            e.deferred_until = Some(*until);
        }
        Settle::Skipped { reason } => {
            e.status = Status::Skipped;
            e.note = Some(reason.clone());
        }
    }
    Merge::Write(Box::new(e))
}

/// A delivery this handler holds: the entry as it last wrote it, and that write's revision.
#[derive(Debug, Clone)]
pub struct Held {
    pub key: LedgerKey,
    /// The revision of the handler's last write, for the next compare-and-set.
    pub revision: u64,
    pub entry: Entry,
    /// The claim as written (`None` when held only to park it).
    pub claim: Option<Claim>,
    /// The message being handled.
    pub sequence: u64,
    /// The provider calls of this attempt, stored with its outcome.
    pub calls: Vec<crate::state::ProviderCall>,
}

impl Held {
    /// The 1-based number of the attempt this claim made, within its round.
    pub fn round_attempt(&self) -> u32 {
        self.entry.round_attempts
    }
}

/// What [`Ledger::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// Claimed: send it. `takeover`: the previous claim's outcome is unknown (a resend).
    Send {
        held: Held,
        takeover: bool,
    },
    Delivered,
    /// Suppressed, skipped, or this message deferred already: acknowledge it.
    Decided(Status),
    InDlq,
    Busy(Duration),
    /// Held for dead-lettering (the entry says so); park the message, then settle `Parked`.
    Park {
        held: Held,
        reason: Reason,
        error_class: ErrorClass,
        error: String,
    },
}

/// How a settle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The outcome is stored.
    Written,
    /// The entry already said something that stands (delivered, or another handler's claim).
    Superseded(Status),
}

/// Reads and writes the ledger, and publishes the status event of each settled attempt.
#[derive(Clone)]
pub struct Ledger {
    kv: kv::Store,
    js: jetstream::Context,
    /// This process's name in claims.
    owner: String,
    /// How long a claim lasts ([`crate::Config::claim_ttl`]).
    claim_ttl: Duration,
}

/// How many compare-and-set conflicts one operation retries before reporting a store error.
const MAX_CONFLICTS: usize = 16;

impl Ledger {
    pub fn new(js: jetstream::Context, kv: kv::Store, claim_ttl: Duration) -> Ledger {
        let owner = format!("{}#{}", std::process::id(), &crate::intent::new_id()[24..]);
        Ledger { kv, js, owner, claim_ttl }
    }

    /// This process's name in claims: `<pid>#<random>`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The entry at `key` and its revision. An entry that cannot be read (written by hand, say)
    /// counts as none, with its revision, so the next write replaces it instead of the
    /// notification being blocked forever.
    pub async fn read(&self, key: &LedgerKey) -> Result<(Option<Entry>, Option<u64>), StateError> {
        let name = key.kv_key();
        let found = self.kv.entry(&name).await.map_err(store)?;
        let Some(found) = found else { return Ok((None, None)) };
        if found.operation != kv::Operation::Put {
            return Ok((None, Some(found.revision)));
        }
        match serde_json::from_slice(&found.value) {
            Ok(entry) => Ok((Some(entry), Some(found.revision))),
            Err(error) => {
                tracing::error!(key = %name, %error, "unreadable ledger entry; it will be replaced");
                Ok((None, Some(found.revision)))
            }
        }
    }

    /// Writes `entry` at `key` if the key is still at `revision` (`None`: absent or deleted).
    /// `Ok(None)`: somebody wrote first.
    async fn write(
        &self,
        key: &str,
        entry: &Entry,
        revision: Option<u64>,
    ) -> Result<Option<u64>, StateError> {
        let bytes = serde_json::to_vec(entry).expect("an entry always serializes");
        match revision {
            None => match self.kv.create(key, bytes.into()).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(store(e)),
            },
            Some(rev) => match self.kv.update(key, bytes.into(), rev).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(store(e)),
            },
        }
    }

    /// Records that these intents are stored (one per channel of a notification): the
    /// gateway's record of an accepted request, and a worker's of a direct publish waiting for
    /// its `send_at`. Entries that exist already (a repeated request) are left alone.
    pub async fn accept(&self, intents: &[Intent]) -> Result<(), StateError> {
        let now = Utc::now();
        let writes = intents.iter().map(|intent| async move {
            let key = LedgerKey::of(intent).kv_key();
            self.write(&key, &Entry::accepted(intent, now), None).await.map(|_| ())
        });
        futures::future::try_join_all(writes).await.map(|_| ())
    }

    /// Records channels of notification `intent.id` that were passed over when the gateway chose
    /// where it goes (`skipped`, with why), beside the channels its intents are stored for.
    pub async fn passed_over(&self, intent: &Intent, passed: &[(Channel, String)]) -> Result<(), StateError> {
        let now = Utc::now();
        let writes = passed.iter().map(|(channel, why)| {
            let key = LedgerKey::new(intent.tenant.as_deref(), &intent.id, *channel).kv_key();
            let mut entry = Entry::accepted(intent, now);
            entry.status = Status::Skipped;
            entry.note = Some(why.clone());
            async move { self.write(&key, &entry, None).await.map(|_| ()) }
        });
        futures::future::try_join_all(writes).await.map(|_| ())
    }

    /// Decides what to do with message `sequence` carrying `intent`, and takes the claim (or
    /// the hold for parking) that decision needs, with a compare-and-set. See [`decide`].
    ///
    /// `handling` tells whether this process is handling a message (by sequence) right now: a
    /// claim of this process's naming a message it is not handling was never used to send.
    pub async fn begin(
        &self,
        intent: &Intent,
        sequence: u64,
        max_attempts: u32,
        policy: UncertainPolicy,
        final_delivery: bool,
        handling: impl Fn(u64) -> bool,
    ) -> Result<Begin, StateError> {
        let key = LedgerKey::of(intent);
        let name = key.kv_key();
        let mut store_errors = 0;
        for _ in 0..MAX_CONFLICTS {
            let (current, revision) = self.read(&key).await?;
            let now = Utc::now();
            let expired = intent.expires_at.is_some_and(|t| t <= now);
            let own_idle = current
                .as_ref()
                .and_then(|e| e.claim.as_ref())
                .is_some_and(|c| c.owner == self.owner && (c.sequence == sequence || !handling(c.sequence)));
            let decision = decide(
                current.as_ref(),
                sequence,
                now,
                max_attempts,
                policy,
                expired,
                final_delivery,
                own_idle,
            );
            let base = current.clone().unwrap_or_else(|| Entry::accepted(intent, now));
            let (entry, claim) = match &decision {
                Decision::Delivered => return Ok(Begin::Delivered),
                Decision::Decided(s) => return Ok(Begin::Decided(*s)),
                Decision::InDlq => return Ok(Begin::InDlq),
                Decision::Busy(d) => return Ok(Begin::Busy(*d)),
                Decision::Send { takeover, new_round, reclaim } => {
                    let claim = Claim {
                        owner: self.owner.clone(),
                        sequence,
                        until: now + chrono::Duration::from_std(self.claim_ttl).expect("claim ttl fits"),
                    };
                    let mut e = base;
                    e.status = Status::Sending;
                    if !*reclaim {
                        e.attempts += 1;
                        e.round_attempts = if *new_round { 1 } else { e.round_attempts + 1 };
                    }
                    e.resends += u32::from(*takeover);
                    e.parking = None;
                    e.claim = Some(claim.clone());
                    e.retry_at = None;
                    e.sequence = Some(sequence);
                    e.updated_at = now;
                    (e, Some(claim))
                }
                Decision::Park { reason, error_class, error } => {
                    let outcome =
                        Settle::Parking { reason: *reason, error_class: *error_class, error: error.clone() };
                    // Parking a lapsed claim is this handler's to do: take it over first.
                    let mut from = base;
                    from.claim = None;
                    let Merge::Write(mut e) = merge(&from, None, &outcome, now) else {
                        unreachable!("a delivered entry is decided as delivered")
                    };
                    e.sequence = Some(sequence);
                    (*e, None)
                }
            };
            // A write whose answer is lost may have landed: read again rather than give up, and the
            // claim found is then recognised as this handler's own (`own_idle`) and reclaimed.
            let written = match self.write(&name, &entry, revision).await {
                Ok(w) => w,
                Err(e) => {
                    store_errors += 1;
                    if store_errors > 3 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(100) * store_errors).await;
                    continue;
                }
            };
            let Some(revision) = written else { continue };
            let held =
                Held { key: key.clone(), revision, entry: entry.clone(), claim, sequence, calls: Vec::new() };
            return Ok(match decision {
                Decision::Send { takeover, .. } => Begin::Send { held, takeover },
                Decision::Park { reason, error_class, error } => {
                    Begin::Park { held, reason, error_class, error }
                }
                _ => unreachable!("returned above"),
            });
        }
        Err(StateError::Store(format!("{name}: too many concurrent writers")))
    }

    /// Stores `outcome` of the delivery `held`, retrying through store errors (NATS down, a
    /// leader election, a full store) until it is stored or `patience` runs out, and publishes
    /// its status event. Nothing may be acknowledged before this returns `Ok`.
    pub async fn settle(
        &self,
        held: &mut Held,
        outcome: Settle,
        patience: Duration,
    ) -> Result<Settled, StateError> {
        let deadline = tokio::time::Instant::now() + patience;
        let name = held.key.kv_key();
        let now = Utc::now();
        let mut delay = Duration::from_millis(50);
        let mut conflicts = 0;
        let mut stored = None;
        loop {
            let step = async {
                let settled = match stored {
                    Some(s) => s,
                    None => match self.try_settle(held, &outcome, now).await? {
                        Some(s) => s,
                        None => return Ok(None),
                    },
                };
                stored = Some(settled);
                // Our own write may have landed with its answer lost: the retry then finds it.
                let ours = settled == Settled::Written
                    || (outcome == Settle::Delivered && settled == Settled::Superseded(Status::Delivered));
                let event = match outcome {
                    Settle::Delivered => Some(Outcome::Delivered),
                    Settle::Retrying { .. } | Settle::Waiting { .. } => Some(Outcome::Retrying),
                    Settle::Parked => Some(Outcome::DeadLettered),
                    Settle::Parking { .. } => None,
                    Settle::Suppressed { .. } => Some(Outcome::Suppressed),
                    Settle::Throttled { .. } => Some(Outcome::Throttled),
                    Settle::Deferred { .. } => Some(Outcome::Deferred),
                    Settle::Skipped { .. } => Some(Outcome::Skipped),
                };
                if let Some(event) = event.filter(|_| ours) {
                    self.publish_event(held, event).await?;
                }
                Ok(Some(settled))
            };
            match step.await {
                Ok(Some(settled)) => return Ok(settled),
                Ok(None) => {
                    // Someone wrote in between; a lagging replica can answer a read with an older
                    // revision for a moment, so back off a little and count it against patience.
                    conflicts += 1;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StateError::Store(format!("{name}: too many concurrent writers")));
                    }
                    tokio::time::sleep(Duration::from_millis(5) * conflicts.min(200)).await;
                }
                Err(e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(key = %name, error = %e, "cannot record the outcome yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One compare-and-set of `outcome` onto the entry. `Ok(None)`: someone wrote in between
    /// (or our own earlier write landed and its answer was lost); the next try reads and
    /// merges again.
    async fn try_settle(
        &self,
        held: &mut Held,
        outcome: &Settle,
        now: DateTime<Utc>,
    ) -> Result<Option<Settled>, StateError> {
        let (current, revision) = if held.revision == 0 {
            let (current, revision) = self.read(&held.key).await?;
            (current.unwrap_or_else(|| held.entry.clone()), revision)
        } else {
            (held.entry.clone(), Some(held.revision))
        };
        let mut entry = match merge(&current, held.claim.as_ref(), outcome, now) {
            Merge::Keep(status) => return Ok(Some(Settled::Superseded(status))),
            Merge::Write(e) => *e,
        };
        if !held.calls.is_empty() {
            entry.calls = held.calls.clone();
        }
        match self.write(&held.key.kv_key(), &entry, revision).await {
            Ok(Some(rev)) => {
                held.revision = rev;
                held.entry = entry;
                Ok(Some(Settled::Written))
            }
            Ok(None) => {
                held.revision = 0;
                Ok(None)
            }
            Err(e) => {
                // The write may or may not have landed: read before the next try.
                held.revision = 0;
                Err(e)
            }
        }
    }

    /// Publishes the status event of the attempt `held` records. Its message id makes a
    /// retried publish a duplicate the stream drops.
    async fn publish_event(&self, held: &Held, outcome: Outcome) -> Result<(), StateError> {
        let e = &held.entry;
        let event = StatusEvent {
            notification_id: held.key.id.clone(),
            channel: held.key.channel,
            outcome,
            attempt: e.attempts,
            error: match outcome {
                Outcome::Retrying | Outcome::DeadLettered => e.last_error.clone(),
                _ => None,
            },
            note: match outcome {
                Outcome::Suppressed | Outcome::Deferred | Outcome::Skipped | Outcome::Throttled => {
                    e.note.clone()
                }
                _ => None,
            },
            correlation_id: e.correlation_id.clone(),
            tenant: e.tenant.clone(),
            retry_at: match outcome {
                Outcome::Retrying => e.retry_at,
                Outcome::Deferred => e.deferred_until,
                _ => None,
            },
            calls: held.calls.clone(),
            at: e.updated_at,
        };
        let mut headers = HeaderMap::new();
        // The same event retried keeps its id; a breaker wait after a failed attempt has the
        // attempt number and outcome of that attempt's event, so the time tells them apart.
        let msg_id = format!(
            "{}.{}.{}.{}.{}",
            held.key.kv_key(),
            held.sequence,
            e.attempts,
            outcome,
            e.updated_at.timestamp_micros()
        );
        headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
        let payload = serde_json::to_vec(&event).expect("an event always serializes");
        self.js
            .publish_with_headers(
                topology::status_subject(held.key.channel, outcome),
                headers,
                payload.into(),
            )
            .await
            .map_err(store)?
            .await
            .map_err(store)?;
        Ok(())
    }

    /// The notification `id` of `tenant` across its channels, as `GET` shows it.
    pub async fn record(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<NotificationRecord>, StateError> {
        // Every channel: one without a worker can still have an entry, as a channel the gateway
        // passed over (`skipped`) on the way to the user's next one.
        let reads = Channel::ALL.into_iter().map(|c| {
            let key = LedgerKey::new(tenant, id, c);
            async move { self.read(&key).await.map(|(e, _)| e.map(|e| (c, e))) }
        });
        let entries: Vec<(Channel, Entry)> =
            futures::future::try_join_all(reads).await?.into_iter().flatten().collect();
        let Some((_, first)) = entries.first() else { return Ok(None) };
        Ok(Some(NotificationRecord {
            id: id.to_owned(),
            correlation_id: first.correlation_id.clone(),
            tenant: first.tenant.clone(),
            created_at: entries.iter().map(|(_, e)| e.created_at).min().unwrap_or(first.created_at),
            channels: entries.iter().map(|(c, e)| (*c, e.state())).collect::<BTreeMap<_, _>>(),
        }))
    }

    /// Every entry of notification `id`, whatever its tenant: an operator's lookup (the console)
    /// where the tenant is not known. One stream-info request finds the keys, then each is read.
    pub async fn find(&self, id: &str) -> Result<Vec<(Channel, Entry)>, StateError> {
        use futures::TryStreamExt;
        // Ids the gateway makes are letters, digits, `-` and `_`; anything else (a wildcard, a
        // dot) would widen the pattern beyond this id.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Ok(Vec::new());
        }
        let prefix = format!("$KV.{}.", self.kv.name);
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(format!("{prefix}*.{id}.*"))
            .await
            .map_err(store)?
            .try_collect()
            .await
            .map_err(store)?;
        let mut found = Vec::new();
        for (subject, _) in subjects {
            let Some(key) = subject.strip_prefix(&prefix) else { continue };
            let Some(channel) = key.rsplit('.').next().and_then(|c| c.parse::<Channel>().ok()) else {
                continue;
            };
            let entry = self.kv.entry(key).await.map_err(store)?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put)
                && let Ok(e) = serde_json::from_slice::<Entry>(&entry.value)
            {
                found.push((channel, e));
            }
        }
        Ok(found)
    }
}

fn store(e: impl std::fmt::Display) -> StateError {
    StateError::Store(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::Recipient;

    fn intent() -> Intent {
        let mut i = Intent::new(
            Channel::Webhook,
            Recipient { webhook_url: Some("https://example.com/h".into()), ..Default::default() },
        );
        i.tenant = Some("acme".into());
        i
    }

    fn entry(status: Status) -> Entry {
        let mut e = Entry::accepted(&intent(), Utc::now());
        e.status = status;
        e
    }

    fn claim(owner: &str, sequence: u64, secs_left: i64) -> Claim {
        Claim { owner: owner.into(), sequence, until: Utc::now() + chrono::Duration::seconds(secs_left) }
    }

    fn sending(owner: &str, sequence: u64, secs_left: i64, round_attempts: u32) -> Entry {
        let mut e = entry(Status::Sending);
        e.claim = Some(claim(owner, sequence, secs_left));
        e.sequence = Some(sequence);
        e.attempts = round_attempts;
        e.round_attempts = round_attempts;
        e
    }

    fn parked(sequence: u64, confirmed: bool) -> Entry {
        let mut e = entry(Status::DeadLettered);
        e.sequence = Some(sequence);
        e.parking = Some(Parking {
            reason: Reason::Rejected,
            error_class: ErrorClass::Permanent,
            error: "HTTP 400".into(),
            confirmed,
        });
        e
    }

    /// One case: the entry read, the message, what the handler may do.
    fn check(
        current: Option<Entry>,
        sequence: u64,
        policy: UncertainPolicy,
        final_delivery: bool,
        expected: &str,
    ) {
        check_own(current, sequence, policy, final_delivery, false, expected)
    }

    fn check_own(
        current: Option<Entry>,
        sequence: u64,
        policy: UncertainPolicy,
        final_delivery: bool,
        own_idle: bool,
        expected: &str,
    ) {
        let got = decide(current.as_ref(), sequence, Utc::now(), 3, policy, false, final_delivery, own_idle);
        let got = match got {
            Decision::Send { reclaim: true, .. } => "reclaim".to_owned(),
            Decision::Send { takeover: false, new_round: false, .. } => "send".to_owned(),
            Decision::Send { takeover: true, new_round: false, .. } => "resend".to_owned(),
            Decision::Send { takeover, new_round: true, .. } => {
                format!("send new round (takeover {takeover})")
            }
            Decision::Delivered => "ack".to_owned(),
            Decision::Decided(s) => format!("ack {s:?}"),
            Decision::InDlq => "term".to_owned(),
            Decision::Busy(_) => "busy".to_owned(),
            Decision::Park { reason, .. } => format!("park {}", reason.as_str()),
        };
        assert_eq!(got, expected, "{current:?} seq {sequence} {policy:?} final {final_delivery}");
    }

    #[test]
    fn each_entry_decides_what_a_handler_does() {
        use UncertainPolicy::{Park, Resend};
        check(None, 1, Resend, false, "send");
        check(Some(entry(Status::Accepted)), 1, Resend, false, "send");
        check(Some(entry(Status::Scheduled)), 1, Resend, false, "send");
        check(Some(entry(Status::Retrying)), 1, Resend, false, "send");
        check(Some(entry(Status::Delivered)), 1, Resend, false, "ack");
        check(Some(entry(Status::Delivered)), 9, Park, true, "ack");
        // Decided without a send: final, whatever message comes.
        check(Some(entry(Status::Suppressed)), 2, Resend, false, "ack Suppressed");
        check(Some(entry(Status::Skipped)), 2, Resend, true, "ack Skipped");
        // Deferred: the message that was deferred is done; its scheduled copy is sent.
        let mut deferred = entry(Status::Deferred);
        deferred.sequence = Some(1);
        check(Some(deferred.clone()), 1, Resend, false, "ack Deferred");
        check(Some(deferred), 2, Resend, false, "send");
        // A live claim is another handler's: wait, whoever holds it and whatever the message.
        check(Some(sending("other", 1, 30, 1)), 1, Resend, false, "busy");
        check(Some(sending("other", 1, 30, 1)), 2, Resend, false, "busy");
        check(Some(sending("other", 1, 30, 1)), 1, Resend, true, "busy");
        // A lapsed claim: its worker died mid-send.
        check(Some(sending("dead", 1, -1, 1)), 1, Resend, false, "resend");
        check(Some(sending("dead", 1, -1, 1)), 1, Park, false, "park uncertain");
        check(Some(sending("dead", 1, -1, 3)), 1, Resend, false, "park uncertain");
        check(Some(sending("dead", 1, -1, 1)), 1, Resend, true, "park uncertain");
        // Dead letters: this message is parked (or its parking is unfinished); another is a replay.
        check(Some(parked(1, true)), 1, Resend, false, "term");
        check(Some(parked(1, false)), 1, Resend, false, "park rejected");
        check(Some(parked(1, true)), 2, Resend, false, "send new round (takeover false)");
        // Attempts used up, and the mover's last word on a message nobody finished.
        let mut spent = entry(Status::Retrying);
        spent.round_attempts = 3;
        check(Some(spent), 1, Resend, false, "park attempts_exhausted");
        check(Some(entry(Status::Retrying)), 1, Resend, true, "park max_deliveries");
        check(None, 1, Resend, true, "park max_deliveries");
        // This process's own claim, on a message it is not handling: its claim's answer was
        // lost, nothing was sent, so it is neither busy nor uncertain.
        check_own(Some(sending("me", 1, 30, 1)), 1, Park, false, true, "reclaim");
        check_own(Some(sending("me", 1, -1, 1)), 1, Park, false, true, "reclaim");
        check_own(Some(sending("me", 1, -1, 1)), 1, Park, true, true, "park uncertain");
    }

    #[test]
    fn an_expired_intent_is_parked_not_sent() {
        let got = decide(None, 1, Utc::now(), 3, UncertainPolicy::Resend, true, false, false);
        assert!(matches!(got, Decision::Park { reason: Reason::Expired, .. }), "{got:?}");
        let got = decide(
            Some(&entry(Status::Delivered)),
            1,
            Utc::now(),
            3,
            UncertainPolicy::Resend,
            true,
            false,
            false,
        );
        assert_eq!(got, Decision::Delivered);
    }

    #[test]
    fn nothing_overwrites_delivered_and_a_taken_over_claim_stays_taken() {
        let now = Utc::now();
        let mine = claim("me", 1, 30);
        let retry = Settle::Retrying { error: "HTTP 503".into(), retry_at: Utc::now() };
        let park = Settle::Parking {
            reason: Reason::Rejected,
            error_class: ErrorClass::Permanent,
            error: "x".into(),
        };
        // Delivered is final against every late write.
        for outcome in [retry.clone(), park.clone(), Settle::Parked, Settle::Delivered] {
            assert_eq!(
                merge(&entry(Status::Delivered), Some(&mine), &outcome, now),
                Merge::Keep(Status::Delivered)
            );
        }
        // So are suppressed and skipped; a deferral is followed by a send.
        for status in [Status::Suppressed, Status::Skipped] {
            assert_eq!(merge(&entry(status), Some(&mine), &Settle::Delivered, now), Merge::Keep(status));
        }
        let until = now + chrono::Duration::hours(2);
        let deferral = Settle::Deferred { until, why: "quiet hours".into() };
        let Merge::Write(e) = merge(&sending("me", 1, 30, 1), Some(&mine), &deferral, now) else { panic!() };
        assert_eq!(
            (e.status, e.deferred_until, e.note.as_deref()),
            (Status::Deferred, Some(until), Some("quiet hours"))
        );
        let Merge::Write(e) = merge(&e, Some(&mine), &Settle::Delivered, now) else { panic!() };
        assert_eq!(e.status, Status::Delivered);
        // Someone took the claim over: a failure leaves it theirs, a delivery still lands.
        let theirs = sending("other", 1, 30, 2);
        assert_eq!(merge(&theirs, Some(&mine), &retry, now), Merge::Keep(Status::Sending));
        let Merge::Write(e) = merge(&theirs, Some(&mine), &Settle::Delivered, now) else { panic!() };
        assert_eq!((e.status, e.claim), (Status::Delivered, None));
        // The mover parked it meanwhile: a stale retry does not undo that.
        assert_eq!(merge(&parked(1, true), Some(&mine), &retry, now), Merge::Keep(Status::DeadLettered));
        // Our own claim settles normally.
        let Merge::Write(e) = merge(&sending("me", 1, 30, 1), Some(&mine), &retry, now) else { panic!() };
        assert_eq!((e.status, e.last_error.as_deref()), (Status::Retrying, Some("HTTP 503")));
        let Merge::Write(e) = merge(&sending("me", 1, 30, 1), Some(&mine), &park, now) else { panic!() };
        assert_eq!(e.status, Status::DeadLettered);
        assert!(!e.parking.as_ref().unwrap().confirmed);
        let Merge::Write(e) = merge(&e, None, &Settle::Parked, now) else { panic!() };
        assert!(e.parking.unwrap().confirmed);
    }

    #[test]
    fn keys_are_scoped_by_tenant_and_stay_valid_kv_keys() {
        let key = |t: Option<&str>| LedgerKey::new(t, "order-43", Channel::Webhook).kv_key();
        assert_eq!(key(Some("acme")), "t_acme.order-43.webhook");
        assert_eq!(key(None), "none.order-43.webhook");
        assert_eq!(key(Some("a.b c")), "x_612e622063.order-43.webhook");
        assert_ne!(key(Some("acme")), key(Some("globex")));
        // A tenant cannot impersonate another form.
        assert_ne!(key(Some("none")), key(None));
        assert_ne!(key(Some("x_61")), key(Some("a")));
        for k in [key(Some("acme")), key(None), key(Some("ü/ñ:*>"))] {
            assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{k}");
        }
    }
}
