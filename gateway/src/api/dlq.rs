//! `/v1/dlq`: dead letters over HTTP, on the dead-letter core (`herald_shared::dlq`) that
//! `herald dlq` and `herald console` share.
//!
//! Scope `dlq:admin`. A token bound to a tenant (a `tenant` claim) sees and acts on that
//! tenant's letters only; a token without one is an operator's and sees every tenant's.
//! Bulk actions run in the gateway as jobs at the requested rate; `GET /v1/dlq/jobs/{job}`
//! follows one. A job interrupted by a restart is resumed by posting the same filter again:
//! letters leave the DLQ as they are acted on, so it finds exactly what is left.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use herald_shared::{
    auth::{Claims, SCOPE_DLQ_ADMIN},
    deadletter::{ErrorClass, Reason},
    dlq::{self, Actor, Bulk, DeadLetters, Detail, Filter, Letter, Progress, Replayed},
    ledger::Entry,
};
use poem::web::Data;
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use serde::Deserialize;

use super::{
    Tags,
    notifications::{ApiChannel, ApiStatus},
};
use crate::{
    AppState,
    auth::BearerAuth,
    errors::{ApiError, ErrorResponse},
    payload::StrictJson,
};

pub struct DlqApi;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename = "DeadLetterReason", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ApiReason {
    Undecodable,
    Invalid,
    Expired,
    Rejected,
    AttemptsExhausted,
    MaxDeliveries,
    Uncertain,
}

impl From<ApiReason> for Reason {
    fn from(r: ApiReason) -> Reason {
        match r {
            ApiReason::Undecodable => Reason::Undecodable,
            ApiReason::Invalid => Reason::Invalid,
            ApiReason::Expired => Reason::Expired,
            ApiReason::Rejected => Reason::Rejected,
            ApiReason::AttemptsExhausted => Reason::AttemptsExhausted,
            ApiReason::MaxDeliveries => Reason::MaxDeliveries,
            ApiReason::Uncertain => Reason::Uncertain,
        }
    }
}

impl From<Reason> for ApiReason {
    fn from(r: Reason) -> ApiReason {
        match r {
            Reason::Undecodable => ApiReason::Undecodable,
            Reason::Invalid => ApiReason::Invalid,
            Reason::Expired => ApiReason::Expired,
            Reason::Rejected => ApiReason::Rejected,
            Reason::AttemptsExhausted => ApiReason::AttemptsExhausted,
            Reason::MaxDeliveries => ApiReason::MaxDeliveries,
            Reason::Uncertain => ApiReason::Uncertain,
        }
    }
}

/// Whether retrying could have helped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename = "ErrorClass", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorClass {
    Transient,
    Permanent,
}

impl From<ApiErrorClass> for ErrorClass {
    fn from(c: ApiErrorClass) -> ErrorClass {
        match c {
            ApiErrorClass::Transient => ErrorClass::Transient,
            ApiErrorClass::Permanent => ErrorClass::Permanent,
        }
    }
}

impl From<ErrorClass> for ApiErrorClass {
    fn from(c: ErrorClass) -> ApiErrorClass {
        match c {
            ErrorClass::Transient => ApiErrorClass::Transient,
            ErrorClass::Permanent => ApiErrorClass::Permanent,
        }
    }
}

/// Which dead letters: every field narrows; none matches every letter.
#[derive(Debug, Clone, Default, Object, Deserialize)]
#[oai(rename = "DeadLetterFilter", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct FilterBody {
    channel: Option<ApiChannel>,
    reason: Option<ApiReason>,
    error_class: Option<ApiErrorClass>,
    /// Only this tenant's letters (a tenant-bound token is always limited to its own).
    tenant: Option<String>,
    /// Only this notification's letters.
    notification_id: Option<String>,
    /// Parked at least this many seconds ago.
    older_than_seconds: Option<u64>,
    /// Parked at most this many seconds ago.
    newer_than_seconds: Option<u64>,
    /// Text the last error contains (case-insensitive).
    #[oai(validator(max_length = 256))]
    text: Option<String>,
}

impl FilterBody {
    /// The core's filter, limited to the caller's tenant when its token is bound to one.
    fn into_filter(self, claims: &Claims) -> Result<Filter, ApiError> {
        let tenant = match (&claims.tenant, self.tenant) {
            (Some(own), Some(asked)) if *own != asked => {
                return Err(ApiError::invalid("tenant", "a tenant-bound token can only see its own tenant"));
            }
            (Some(own), _) => Some(own.clone()),
            (None, asked) => asked,
        };
        Ok(Filter {
            channel: self.channel.map(Into::into),
            reason: self.reason.map(Into::into),
            error_class: self.error_class.map(Into::into),
            tenant,
            notification_id: self.notification_id,
            older_than: self.older_than_seconds.map(Duration::from_secs),
            newer_than: self.newer_than_seconds.map(Duration::from_secs),
            text: self.text,
        })
    }
}

/// One dead letter.
#[derive(Debug, Object)]
#[oai(rename = "DeadLetter", skip_serializing_if_is_none)]
pub struct LetterBody {
    /// Its sequence in HERALD_DLQ, which names it in every other operation.
    sequence: u64,
    channel: Option<ApiChannel>,
    /// When it was parked.
    dead_at: DateTime<Utc>,
    /// Absent for a message that is not in Herald's dead-letter format.
    reason: Option<ApiReason>,
    error_class: Option<ApiErrorClass>,
    /// Attempts made in the round that ended here.
    attempts: Option<u32>,
    last_error: Option<String>,
    notification_id: Option<String>,
    tenant: Option<String>,
    correlation_id: Option<String>,
    /// The intent's subject and sequence in HERALD_INTENTS.
    original_subject: Option<String>,
    original_sequence: Option<u64>,
    /// Set when only the first bytes of a too-large intent were parked: its length.
    truncated_from: Option<u64>,
    /// Why the parked intent does not decode, if it does not (such letters cannot be replayed).
    decode_error: Option<String>,
}

impl From<Letter> for LetterBody {
    fn from(l: Letter) -> LetterBody {
        let p = l.parked;
        LetterBody {
            sequence: l.sequence,
            channel: l.channel.map(Into::into),
            dead_at: l.dead_at,
            reason: p.as_ref().map(|p| p.reason.into()),
            error_class: p.as_ref().map(|p| p.error_class.into()),
            attempts: p.as_ref().map(|p| p.attempts),
            last_error: p.as_ref().map(|p| p.last_error.clone()),
            notification_id: l.notification_id,
            tenant: l.tenant,
            correlation_id: l.correlation_id,
            original_subject: p.as_ref().map(|p| p.original_subject.clone()),
            original_sequence: p.as_ref().map(|p| p.original_sequence),
            truncated_from: l.truncated_from,
            decode_error: l.decode_error,
        }
    }
}

/// A page of dead letters, oldest first.
#[derive(Debug, Object)]
#[oai(rename = "DeadLetterPage", skip_serializing_if_is_none)]
pub struct PageBody {
    letters: Vec<LetterBody>,
    /// Pass as `after` for the next page; absent at the end of the queue.
    next: Option<u64>,
}

/// The notification's ledger entry on the letter's channel.
#[derive(Debug, Object)]
#[oai(rename = "LedgerEntry", skip_serializing_if_is_none)]
pub struct EntryBody {
    status: ApiStatus,
    /// Sends started over the notification's life, every round included.
    attempts: u32,
    /// Sends started in the latest round (a replay starts a new one).
    round_attempts: u32,
    /// Sends repeated because an earlier one's outcome was never recorded.
    resends: u32,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

impl From<Entry> for EntryBody {
    fn from(e: Entry) -> EntryBody {
        EntryBody {
            status: e.status.into(),
            attempts: e.attempts,
            round_attempts: e.round_attempts,
            resends: e.resends,
            last_error: e.last_error,
            created_at: e.created_at,
            updated_at: e.updated_at,
            delivered_at: e.delivered_at,
        }
    }
}

/// A dead letter with its intent and its notification's history.
#[derive(Debug, Object)]
#[oai(rename = "DeadLetterDetail", skip_serializing_if_is_none)]
pub struct DetailBody {
    letter: LetterBody,
    /// Every header as stored (the original ones and `Herald-Dlq-*`).
    headers: BTreeMap<String, String>,
    /// The parked intent, decoded to JSON; absent when it does not decode.
    intent: Option<serde_json::Value>,
    /// Where the notification stands on this channel now.
    ledger: Option<EntryBody>,
}

impl From<Detail> for DetailBody {
    fn from(d: Detail) -> DetailBody {
        let headers = d.letter.headers.iter().cloned().collect();
        DetailBody { headers, intent: d.intent, ledger: d.entry.map(Into::into), letter: d.letter.into() }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "ReplayOutcome", rename_all = "snake_case")]
pub enum ApiReplayOutcome {
    /// Republished to its channel with a fresh attempt budget.
    Requeued,
    /// The ledger says it was delivered: nothing was sent, the letter is removed.
    AlreadyDelivered,
}

/// The answer to a replay.
#[derive(Debug, Object)]
#[oai(rename = "Replay", skip_serializing_if_is_none)]
pub struct ReplayBody {
    sequence: u64,
    outcome: ApiReplayOutcome,
    /// The new message's sequence in HERALD_INTENTS (`requeued`).
    intent_sequence: Option<u64>,
}

/// The answer to a discard.
#[derive(Debug, Object)]
#[oai(rename = "Discard", skip_serializing_if_is_none)]
pub struct DiscardBody {
    sequence: u64,
    /// The reason kept in the audit trail.
    reason: String,
}

/// Replay every letter a filter matches.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "BulkReplayRequest", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct BulkReplayRequest {
    #[oai(default)]
    #[serde(default)]
    filter: FilterBody,
    /// Letters per second (0.1 to 10,000).
    #[oai(validator(minimum(value = "0.1"), maximum(value = "10000")))]
    rate: f64,
}

/// Discard every letter a filter matches.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "BulkDiscardRequest", skip_serializing_if_is_none)]
#[serde(deny_unknown_fields)]
pub struct BulkDiscardRequest {
    #[oai(default)]
    #[serde(default)]
    filter: FilterBody,
    /// Letters per second (0.1 to 10,000).
    #[oai(validator(minimum(value = "0.1"), maximum(value = "10000")))]
    rate: f64,
    /// Why, kept in the audit trail.
    #[oai(validator(min_length = 1, max_length = 512))]
    reason: String,
}

/// A bulk action and how far it has got.
#[derive(Debug, Object)]
#[oai(rename = "DlqJob", skip_serializing_if_is_none)]
pub struct JobBody {
    /// Its id, for `GET /v1/dlq/jobs/{job}`.
    job: String,
    /// Letters the filter matched when it started.
    matched: u64,
    /// Letters acted on or skipped so far.
    done: u64,
    requeued: u64,
    already_delivered: u64,
    discarded: u64,
    /// Letters that matched but could not be replayed (they stay in the queue).
    skipped: u64,
    finished: bool,
    /// Why it stopped early; post the same request again to resume.
    error: Option<String>,
}

fn job_body(job: &str, p: &Progress) -> JobBody {
    JobBody {
        job: job.to_owned(),
        matched: p.matched,
        done: p.done,
        requeued: p.requeued,
        already_delivered: p.already_delivered,
        discarded: p.discarded,
        skipped: p.skipped,
        finished: p.finished,
        error: p.error.clone(),
    }
}

/// Bulk jobs this gateway runs or ran, newest last, with the tenant of the token that started
/// each (`None`: an operator's); the oldest finished ones are forgotten.
#[derive(Default)]
pub struct Jobs(Mutex<VecDeque<Job>>);

struct Job {
    id: String,
    tenant: Option<String>,
    progress: tokio::sync::watch::Receiver<Progress>,
}

/// How many jobs are remembered.
const KEPT_JOBS: usize = 100;

impl Jobs {
    fn add(&self, job: Job) {
        let mut jobs = self.0.lock().expect("never poisoned");
        jobs.push_back(job);
        while jobs.len() > KEPT_JOBS {
            let ended = |j: &Job| {
                let p = j.progress.borrow();
                p.finished || p.error.is_some()
            };
            match jobs.iter().position(ended) {
                Some(i) => {
                    jobs.remove(i);
                }
                None => break,
            }
        }
    }

    /// Job `id`, if the caller may see it: an operator sees every job, a tenant its own.
    fn get(&self, id: &str, claims: &Claims) -> Option<Progress> {
        let jobs = self.0.lock().expect("never poisoned");
        jobs.iter()
            .find(|j| j.id == id && (claims.tenant.is_none() || claims.tenant == j.tenant))
            .map(|j| j.progress.borrow().clone())
    }
}

#[derive(ApiResponse)]
enum ListResponse {
    /// A page of dead letters.
    #[oai(status = 200)]
    Ok(Json<PageBody>),
}

#[derive(ApiResponse)]
enum DetailResponse {
    /// The dead letter.
    #[oai(status = 200)]
    Ok(Json<DetailBody>),
}

#[derive(ApiResponse)]
enum ReplayResponse {
    /// Replayed, or found delivered already.
    #[oai(status = 200)]
    Ok(Json<ReplayBody>),
}

#[derive(ApiResponse)]
enum DiscardResponse {
    /// Discarded.
    #[oai(status = 200)]
    Ok(Json<DiscardBody>),
}

#[derive(ApiResponse)]
enum JobResponse {
    /// The job, started: follow it with `GET /v1/dlq/jobs/{job}`.
    #[oai(status = 202)]
    Started(Json<JobBody>),
}

#[derive(ApiResponse)]
enum JobStatusResponse {
    /// How far the job has got.
    #[oai(status = 200)]
    Ok(Json<JobBody>),
}

fn core(state: &AppState) -> Result<DeadLetters, ApiError> {
    Ok(DeadLetters::new(state.topology()?))
}

/// Within the NATS timeout, or 503.
async fn timely<T>(
    state: &AppState,
    f: impl Future<Output = Result<T, dlq::DlqError>>,
) -> Result<T, ApiError> {
    // A bulk count or a replay is several requests in a row.
    state.within(4, f).await
}

/// The letter `sequence` if this caller may see it; 404 otherwise.
async fn visible(state: &AppState, claims: &Claims, sequence: u64) -> Result<Letter, ApiError> {
    let dlq = core(state)?;
    let letter = timely(state, dlq.get(sequence)).await?;
    match letter {
        Some(l) if claims.tenant.is_none() || claims.tenant == l.tenant => Ok(l),
        _ => Err(dlq::DlqError::NotFound(sequence).into()),
    }
}

#[OpenApi(tag = "Tags::DeadLetters")]
impl DlqApi {
    /// List dead letters
    ///
    /// Oldest first, narrowed by the filters; `next` continues the listing.
    #[oai(path = "/v1/dlq", method = "get", operation_id = "list_dead_letters")]
    #[allow(clippy::too_many_arguments, reason = "one query parameter each")]
    async fn list(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        channel: Query<Option<ApiChannel>>,
        reason: Query<Option<ApiReason>>,
        error_class: Query<Option<ApiErrorClass>>,
        tenant: Query<Option<String>>,
        notification_id: Query<Option<String>>,
        /// Parked at least this many seconds ago.
        older_than_seconds: Query<Option<u64>>,
        /// Parked at most this many seconds ago.
        newer_than_seconds: Query<Option<u64>>,
        /// Text the last error contains (case-insensitive).
        #[oai(validator(max_length = 256))]
        text: Query<Option<String>>,
        /// Start after this sequence (the previous page's `next`).
        #[oai(default)]
        after: Query<u64>,
        /// At most this many letters (1 to 500, default 50).
        #[oai(default = "default_limit", validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<u32>,
    ) -> Result<ListResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        let filter = FilterBody {
            channel: channel.0,
            reason: reason.0,
            error_class: error_class.0,
            tenant: tenant.0,
            notification_id: notification_id.0,
            older_than_seconds: older_than_seconds.0,
            newer_than_seconds: newer_than_seconds.0,
            text: text.0,
        }
        .into_filter(claims)?;
        let dlq = core(&state)?;
        let page = timely(&state, dlq.list(&filter, after.0, limit.0 as usize)).await?;
        Ok(ListResponse::Ok(Json(PageBody {
            letters: page.letters.into_iter().map(Into::into).collect(),
            next: page.next,
        })))
    }

    /// Read a dead letter
    ///
    /// Its headers, the intent decoded to JSON and the notification's ledger entry.
    #[oai(path = "/v1/dlq/:sequence", method = "get", operation_id = "get_dead_letter")]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The letter's sequence in HERALD_DLQ.
        sequence: Path<u64>,
    ) -> Result<DetailResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        visible(&state, claims, sequence.0).await?;
        let dlq = core(&state)?;
        let detail = timely(&state, dlq.detail(sequence.0))
            .await?
            .ok_or(ApiError::from(dlq::DlqError::NotFound(sequence.0)))?;
        Ok(DetailResponse::Ok(Json(detail.into())))
    }

    /// Replay a dead letter
    ///
    /// Republishes the intent to its channel with a fresh attempt budget, keeping its id and
    /// history, and removes the letter. Nothing is sent if the notification was delivered
    /// after all; replaying the same letter again answers 404.
    #[oai(path = "/v1/dlq/:sequence/replay", method = "post", operation_id = "replay_dead_letter")]
    async fn replay(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The letter's sequence in HERALD_DLQ.
        sequence: Path<u64>,
    ) -> Result<ReplayResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        visible(&state, claims, sequence.0).await?;
        let dlq = core(&state)?;
        let actor = Actor(claims.sub.clone());
        let outcome = timely(&state, dlq.replay(sequence.0, &actor)).await?;
        Ok(ReplayResponse::Ok(Json(match outcome {
            Replayed::Requeued { intent_sequence } => ReplayBody {
                sequence: sequence.0,
                outcome: ApiReplayOutcome::Requeued,
                intent_sequence: Some(intent_sequence),
            },
            Replayed::AlreadyDelivered => ReplayBody {
                sequence: sequence.0,
                outcome: ApiReplayOutcome::AlreadyDelivered,
                intent_sequence: None,
            },
        })))
    }

    /// Discard a dead letter
    ///
    /// Deletes it; the reason is kept in the audit trail (HERALD_AUDIT).
    #[oai(path = "/v1/dlq/:sequence", method = "delete", operation_id = "discard_dead_letter")]
    async fn discard(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The letter's sequence in HERALD_DLQ.
        sequence: Path<u64>,
        /// Why it is discarded (required).
        #[oai(validator(min_length = 1, max_length = 512))]
        reason: Query<String>,
    ) -> Result<DiscardResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        visible(&state, claims, sequence.0).await?;
        let dlq = core(&state)?;
        let actor = Actor(claims.sub.clone());
        timely(&state, dlq.discard(sequence.0, &actor, &reason.0)).await?;
        Ok(DiscardResponse::Ok(Json(DiscardBody {
            sequence: sequence.0,
            reason: reason.0.trim().to_owned(),
        })))
    }

    /// Replay every dead letter a filter matches
    ///
    /// Starts a job that replays them oldest first at `rate` per second. Interrupted (say by
    /// a restart), it is resumed by posting the same request again.
    #[oai(path = "/v1/dlq/replay", method = "post", operation_id = "replay_dead_letters")]
    async fn bulk_replay(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        body: StrictJson<BulkReplayRequest>,
    ) -> Result<JobResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        let filter = body.0.filter.into_filter(claims)?;
        start_job(&state, claims, filter, Bulk::Replay, body.0.rate).await
    }

    /// Discard every dead letter a filter matches
    ///
    /// Starts a job that discards them oldest first at `rate` per second, keeping the reason
    /// in the audit trail.
    #[oai(path = "/v1/dlq/discard", method = "post", operation_id = "discard_dead_letters")]
    async fn bulk_discard(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        body: StrictJson<BulkDiscardRequest>,
    ) -> Result<JobResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        let filter = body.0.filter.into_filter(claims)?;
        start_job(&state, claims, filter, Bulk::Discard { reason: body.0.reason }, body.0.rate).await
    }

    /// Follow a bulk job
    #[oai(path = "/v1/dlq/jobs/:job", method = "get", operation_id = "get_dead_letter_job")]
    async fn job(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<AppState>>,
        /// The id a bulk request answered.
        job: Path<String>,
    ) -> Result<JobStatusResponse, ErrorResponse> {
        let claims = auth.require(SCOPE_DLQ_ADMIN)?;
        let progress = state
            .dlq_jobs
            .get(&job.0, claims)
            .ok_or_else(|| ApiError::NotFound(format!("no job {:?} on this gateway", job.0)))?;
        Ok(JobStatusResponse::Ok(Json(job_body(&job.0, &progress))))
    }
}

fn default_limit() -> u32 {
    50
}

/// Starts a bulk job and answers once it has counted what it will act on.
async fn start_job(
    state: &Arc<AppState>,
    claims: &Claims,
    filter: Filter,
    action: Bulk,
    rate: f64,
) -> Result<JobResponse, ErrorResponse> {
    let dlq = core(state)?;
    let actor = Actor(claims.sub.clone());
    let id = herald_shared::intent::new_id();
    let (tx, mut rx) = tokio::sync::watch::channel(Progress::default());
    let job = id.clone();
    let run = tokio::spawn(async move {
        // Jobs outlive the request; nothing stops them but the end of the queue or an error.
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let report = |p: &Progress| {
            tx.send_replace(p.clone());
        };
        match dlq.bulk(&filter, &action, rate, &actor, report, stop).await {
            Ok(p) => {
                tracing::info!(job = %job, done = p.done, finished = p.finished, "dead-letter job ended")
            }
            Err(e) => {
                tracing::warn!(job = %job, error = %e, "dead-letter job failed");
                return Err(e);
            }
        }
        Ok(())
    });
    // The first report comes once the matching letters are counted.
    match tokio::time::timeout(state.config.nats_timeout * 10, rx.changed()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            // The job ended without a report: it failed before starting.
            return match run.await {
                Ok(Err(e)) => Err(ApiError::from(e).into()),
                _ => Err(ApiError::Unavailable("the job could not start".into()).into()),
            };
        }
        Err(_) => return Err(ApiError::Unavailable("NATS did not answer in time".into()).into()),
    }
    let progress = rx.borrow().clone();
    state.dlq_jobs.add(Job { id: id.clone(), tenant: claims.tenant.clone(), progress: rx });
    Ok(JobResponse::Started(Json(job_body(&id, &progress))))
}
