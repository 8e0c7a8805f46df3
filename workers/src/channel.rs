//! The loop every channel worker runs.
//!
//! One durable pull consumer per channel. The worker pulls exactly as many messages as it has
//! free delivery slots (`HERALD_SEND_CONCURRENCY`) and starts each as it arrives, so no
//! message waits in a buffer while its ack wait runs, and memory stays bounded. While a message
//! is handled the worker sends progress acks, so the server redelivers only what a dead worker
//! held. For each message:
//!
//! 1. Decode and validate; a message that fails is parked in HERALD_DLQ (`undecodable` or
//!    `invalid`) and terminated, never retried.
//! 2. A future `send_at` (a direct publish; the gateway schedules its own) waits with a `Nak`.
//! 3. The ledger decides ([`herald_shared::ledger::decide`]): acknowledge what was delivered,
//!    terminate what is in the DLQ, wait for another worker's live claim, park what must be
//!    parked (expired, attempts used up, an uncertain send under `HERALD_UNCERTAIN=park`), or
//!    claim it and send.
//! 4. After the send, the outcome is settled in the ledger — retried for as long as it takes,
//!    the message held meanwhile — and only then acknowledged (`double_ack`, confirmed by the
//!    server): delivered → ack; transient failure with attempts left → `Nak` with the backoff
//!    (or the provider's longer `Retry-After`); permanent failure or the last attempt → park,
//!    settle, terminate.
//!
//! On shutdown the worker stops pulling, `Nak`s what arrives unstarted, and lets deliveries in
//! flight finish (for at most [`SHUTDOWN_GRACE`], after which an unrecorded one is left to be
//! redelivered as uncertain).

use std::{sync::Arc, time::Duration};

use async_nats::{
    header::NATS_MESSAGE_ID,
    jetstream::{AckKind, Message},
};
use chrono::Utc;
use futures::StreamExt;
use herald_shared::{
    Channel, Config, Intent,
    config::UncertainPolicy,
    deadletter::{DeadLetter, ErrorClass, Reason},
    intent::Rejection,
    ledger::{Begin, Held, Settle, Settled},
    state::{FailureKind, Status},
    topology::{self, Lane, Topology},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

use crate::{
    Deliver, DeliveryError,
    park::park,
    resolve::{Resolved, Resolver},
};

/// Longest `Retry-After` honoured; a provider asking for more is retried after this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How long a pull request waits for messages before the worker asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long deliveries in flight may take to finish after a stop is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the consumer's ack floor is noted, to resume a recreated consumer after it.
const FLOOR_EVERY: Duration = Duration::from_secs(1);
/// The longest pause between tries while a message is held for the ledger or the DLQ.
const HOLD_RETRY_MAX: Duration = Duration::from_secs(5);
/// Waits at least this long leave the consumer as scheduled copies instead of `Nak`s
/// (see `ChannelWorker::wait`).
pub const LONG_WAIT: Duration = Duration::from_secs(3);
/// Above this share of HERALD_INTENTS's `max_bytes` (in percent), waits stay `Nak`s rather than
/// add copies to a stream that would make room by dropping its oldest messages.
pub const COPIES_HIGH_WATER: u64 = 80;
/// Effectively forever: a ledger write is retried until it is stored (or shutdown gives up).
const UNTIL_STORED: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct ChannelWorker<D> {
    channel: Channel,
    /// The priority lane this worker serves; each lane has its own consumer and slots.
    lane: Lane,
    config: Config,
    topology: Topology,
    deliver: Arc<D>,
    /// Makes notifications by user and template concrete (address, preferences, rendering).
    resolver: Arc<Resolver>,
    /// `HERALD_UNCERTAIN` for this channel.
    uncertain: UncertainPolicy,
    /// Stream sequences of the messages this process is handling now: a redelivery of one of
    /// them (its progress acks were lost) waits instead of racing it, and the ledger can tell
    /// this process's claims that are in use from ones whose `begin` never heard back.
    handling: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// Whether HERALD_INTENTS had room for scheduled copies, and when that was looked up.
    room: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
    /// Per-recipient limits, when `HERALD_RECIPIENT_LIMIT` sets any.
    throttle: Option<herald_shared::throttle::Throttle>,
    /// What this worker did, for `/metrics`.
    metrics: Arc<crate::metrics::WorkerMetrics>,
}

impl<D: Deliver> ChannelWorker<D> {
    pub fn new(
        channel: Channel,
        lane: Lane,
        config: Config,
        topology: Topology,
        deliver: Arc<D>,
        resolver: Arc<Resolver>,
        metrics: Arc<crate::metrics::WorkerMetrics>,
    ) -> ChannelWorker<D> {
        let uncertain = config.uncertain.for_channel(channel);
        let throttle = (!config.recipient_limits.is_empty()).then(|| {
            herald_shared::throttle::Throttle::new(topology.js.clone(), config.recipient_limits.clone())
        });
        ChannelWorker {
            throttle,
            channel,
            lane,
            config,
            topology,
            deliver,
            resolver,
            uncertain,
            handling: Default::default(),
            room: Default::default(),
            metrics,
        }
    }

    /// Pulls and delivers until `stop` turns true, then waits for in-flight deliveries.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let concurrency = self.config.send_concurrency.for_channel(self.channel);
        let limit = Arc::new(Semaphore::new(concurrency));
        let this = Arc::new(self);
        // The ack floor of the consumer as last seen: where a recreated one resumes.
        let mut floor: Option<u64> = None;
        tracing::info!(channel = %this.channel, lane = ?this.lane, concurrency, uncertain = ?this.uncertain, "worker started");
        let mut stopping = *stop.borrow();
        'outer: while !stopping {
            let mut consumer = match this
                .topology
                .channel_consumer(this.channel, this.lane, &this.config, floor)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(channel = %this.channel, error = %e, "cannot reach the consumer; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => break,
                    }
                }
            };
            // Progress acks follow the consumer's own ack wait, which may differ from what this
            // process would configure (only `herald topology apply` changes an existing consumer).
            let progress_every = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(100));
            let mut noted = tokio::time::Instant::now() - FLOOR_EVERY;
            loop {
                if noted.elapsed() >= FLOOR_EVERY {
                    if let Ok(info) = consumer.info().await {
                        floor = Some(info.ack_floor.stream_sequence);
                    }
                    noted = tokio::time::Instant::now();
                }
                // Pull as many as there are free slots, at least one.
                let first = tokio::select! {
                    p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = stop.changed() => break 'outer,
                };
                let mut permits = vec![first];
                while permits.len() < concurrency {
                    match limit.clone().try_acquire_owned() {
                        Ok(p) => permits.push(p),
                        Err(_) => break,
                    }
                }
                let batch =
                    consumer.batch().max_messages(permits.len()).expires(PULL_EXPIRES).messages().await;
                let mut batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(channel = %this.channel, error = %e, "cannot pull; retrying");
                        drop(permits);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue 'outer;
                    }
                };
                let mut failed = false;
                loop {
                    let next = if stopping {
                        batch.next().await
                    } else {
                        tokio::select! {
                            n = batch.next() => n,
                            _ = stop.changed() => { stopping = true; continue; }
                        }
                    };
                    match next {
                        None => break,
                        Some(Ok(message)) if stopping => {
                            // Pulled, not started: hand it back at once rather than let it wait
                            // out an ack wait.
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                        }
                        Some(Ok(message)) => {
                            let permit = permits.pop().expect("a batch never brings more than it asked for");
                            tokio::spawn(this.clone().handle(message, permit, stop.clone(), progress_every));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(channel = %this.channel, error = %e, "pull error");
                            failed = true;
                        }
                    }
                }
                drop(permits);
                if stopping {
                    break 'outer;
                }
                if failed {
                    // The consumer may be gone (deleted, or lost with a server): look it up again,
                    // recreating it after the last known ack floor if it is missing.
                    continue 'outer;
                }
            }
        }
        // Every permit back means every in-flight delivery has finished.
        let _all = limit.acquire_many(concurrency as u32).await;
        tracing::info!(channel = %this.channel, "worker stopped");
        Ok(())
    }

    /// Handles one message, sending progress acks while it works, and gives up (leaving the
    /// message to be redelivered) only if a stop was asked for and [`SHUTDOWN_GRACE`] passed.
    async fn handle(
        self: Arc<Self>,
        message: Message,
        permit: OwnedSemaphorePermit,
        mut stop: watch::Receiver<bool>,
        progress_every: Duration,
    ) {
        let keepalive = async {
            let mut tick = tokio::time::interval(progress_every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = message.ack_with(AckKind::Progress).await;
            }
        };
        let grace = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            _ = self.handle_message(&message) => {}
            _ = keepalive => {}
            _ = grace => tracing::warn!(channel = %self.channel, "gave up on a delivery at shutdown; it will be redelivered"),
        }
        drop(permit);
    }

    async fn handle_message(&self, message: &Message) {
        let (sequence, published, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published, info.delivered),
            Err(e) => {
                tracing::error!(error = %e, "message without JetStream metadata");
                return;
            }
        };
        let fallback_id =
            message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|v| v.as_str().to_owned());
        let mut intent = match Intent::from_message(
            &message.payload,
            message.headers.as_ref(),
            self.channel,
            fallback_id.as_deref(),
        ) {
            Ok(intent) => intent,
            Err(rejection) => return self.reject(message, sequence, delivered, rejection).await,
        };
        // A copy carrying a long wait (`Herald-Due`) is the same intent again, not a new one.
        let copy =
            message.headers.as_ref().is_some_and(|h| h.get(herald_shared::intent::headers::DUE).is_some());
        if delivered > 1 {
            self.metrics.taken(self.channel, false);
        } else if !copy {
            self.metrics.taken(self.channel, true);
        }
        // A direct publish without `created_at` was created when JetStream stored it.
        if intent.created_at.is_none() {
            let at = chrono::DateTime::from_timestamp(published.unix_timestamp(), published.nanosecond());
            intent.created_at = at.or(Some(Utc::now()));
        }
        let span = tracing::info_span!(
            "deliver",
            channel = %self.channel,
            notification_id = %intent.id,
            correlation_id = intent.correlation_id.as_deref().unwrap_or(""),
            sequence,
        );
        // The trace the gateway started (or the request's) goes on here: queue wait, attempt,
        // provider calls.
        herald_shared::telemetry::continue_trace(&span, |name| {
            message.headers.as_ref()?.get(name).map(|v| v.as_str().to_owned())
        });
        self.handle_intent(message, intent, sequence).instrument(span).await;
    }

    /// A message that cannot be delivered as it is: park it, then terminate it.
    async fn reject(&self, message: &Message, sequence: u64, delivered: i64, rejection: Rejection) {
        tracing::warn!(channel = %self.channel, sequence, reason = rejection.reason().as_str(), error = %rejection, "parking a message that cannot be delivered");
        let letter = DeadLetter {
            reason: rejection.reason(),
            error_class: ErrorClass::Permanent,
            attempts: delivered.max(1) as u32,
            last_error: rejection.to_string(),
            original_subject: message.subject.to_string(),
            original_sequence: sequence,
        };
        self.park_held(message, &letter).await;
        self.metrics.dead_lettered(self.channel, letter.reason.as_str());
        self.ack(message, AckKind::Term).await;
    }

    /// Parks the message, retrying until HERALD_DLQ takes it (NATS down, the DLQ full) while
    /// the message is held with progress acks: a `Nak` would spend one of its deliveries on
    /// every try and, once they ran out, leave it to an advisory.
    async fn park_held(&self, message: &Message, letter: &DeadLetter) {
        let mut delay = Duration::from_millis(100);
        loop {
            match park(
                &self.topology.js,
                self.channel,
                message.payload.clone(),
                message.headers.as_ref(),
                letter,
            )
            .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot park in the DLQ yet; holding the message");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(HOLD_RETRY_MAX);
                }
            }
        }
    }

    async fn handle_intent(&self, message: &Message, intent: Intent, sequence: u64) {
        let ledger = &self.topology.ledger;
        if let Some(left) = topology::due_in(message.headers.as_ref(), Utc::now()) {
            // A scheduled copy fired on the whole second before it is due: wait out the rest.
            tracing::debug!(wait_ms = left.as_millis() as u64, "scheduled copy fired early; waiting");
            return self.nak(message, left).await;
        }
        if let Some(wait) = intent
            .send_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .filter(|w| *w > Duration::from_secs(1))
        {
            // Published straight to the subject with a future `send_at`: wait for it here.
            if let Err(e) = ledger.accept(std::slice::from_ref(&intent)).await {
                tracing::warn!(error = %e, "cannot note the schedule in the ledger");
            }
            tracing::info!(wait_ms = wait.as_millis() as u64, "scheduled; waiting for send_at");
            return self.wait(message, &intent, wait, "send_at").await;
        }
        if !self.handling.lock().expect("never poisoned").insert(sequence) {
            tracing::info!("this message is being handled here already; waiting");
            return self.nak(message, self.config.claim_ttl() / 2).await;
        }
        if self.handle_claimed(message, intent, sequence).await {
            self.handling.lock().expect("never poisoned").remove(&sequence);
        }
    }

    /// Returns false when it sent and could not record the outcome: the sequence then stays
    /// marked as handled here, so this process never mistakes its claim for an unused one.
    async fn handle_claimed(&self, message: &Message, intent: Intent, sequence: u64) -> bool {
        let ledger = &self.topology.ledger;
        let max_attempts = self.config.retry.max_attempts;
        let handling = |s: u64| self.handling.lock().expect("never poisoned").contains(&s);
        // Nothing is sent without the ledger: hold the message until it answers, rather than
        // spend its deliveries on Naks (an outage would then turn into dead letters).
        let mut delay = Duration::from_millis(100);
        let begin = loop {
            match ledger.begin(&intent, sequence, max_attempts, self.uncertain, false, handling).await {
                Ok(b) => break b,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot claim the delivery in the ledger yet; holding the message");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(HOLD_RETRY_MAX);
                }
            }
        };
        let mut held = match begin {
            Begin::Delivered => {
                tracing::info!("already delivered; acknowledging without sending again");
                self.ack(message, AckKind::Ack).await;
                return true;
            }
            Begin::Decided(status) => {
                tracing::info!(?status, "already decided without a send; acknowledging");
                self.ack(message, AckKind::Ack).await;
                return true;
            }
            Begin::InDlq => {
                tracing::info!("this message is already in the DLQ; terminating it without sending");
                self.ack(message, AckKind::Term).await;
                return true;
            }
            Begin::Busy(left) => {
                tracing::info!(wait_ms = left.as_millis() as u64, "another worker holds the claim; waiting");
                self.nak(message, left + Duration::from_millis(100)).await;
                return true;
            }
            Begin::Park { held, reason, error_class, error } => {
                tracing::warn!(reason = reason.as_str(), %error, "dead-lettering without sending");
                return self.dead_letter(message, held, reason, error_class, error, true).await;
            }
            Begin::Send { held, takeover } => {
                if takeover {
                    tracing::warn!(
                        "resending: the worker that sent the last attempt died before recording its outcome (HERALD_UNCERTAIN=resend)"
                    );
                }
                held
            }
        };
        let attempt = held.round_attempt();
        let sent = match self.resolver.resolve(&intent, Utc::now()) {
            Ok(Resolved::Send(_))
                if attempt == 1
                    && let Some(limit) = self.over_limit(&intent).await =>
            {
                return self.decided(message, &intent, held, Resolved::Throttle(limit)).await;
            }
            Ok(Resolved::Send(concrete)) => {
                self.metrics.attempted(self.channel);
                let delivery = self.deliver.deliver(&concrete).await;
                held.calls = delivery.calls;
                delivery.result
            }
            Ok(decided) => return self.decided(message, &intent, held, decided).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                tracing::info!(attempt, "delivered");
                match self.settle(&mut held, Settle::Delivered).await {
                    Ok(_) => self.ack(message, AckKind::Ack).await,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the delivery; leaving the message unacknowledged");
                        return false;
                    }
                }
            }
            Err(DeliveryError::Transient { message: error, retry_after })
                if self.waits_for_breaker(&intent, &held) =>
            {
                // No provider was called: not an attempt. Wait for the breaker's probe (spread
                // out a little, so the waiting messages do not all return at once).
                let base = retry_after.unwrap_or(LONG_WAIT).max(LONG_WAIT);
                let delay = base.mul_f64(1.0 + rand::random::<f64>() * 0.2);
                tracing::info!(%error, retry_in_ms = delay.as_millis() as u64, "circuit open; waiting without spending an attempt");
                let retry_at = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                match self.settle(&mut held, Settle::Waiting { error, retry_at }).await {
                    Ok(Settled::Superseded(Status::Delivered)) => self.ack(message, AckKind::Ack).await,
                    Ok(_) => {
                        let step = format!("circuit:{}", retry_at.timestamp_millis());
                        self.wait(message, &intent, delay, &step).await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the wait; leaving the message unacknowledged");
                        return false;
                    }
                }
            }
            Err(DeliveryError::Transient { message: error, retry_after }) if attempt < max_attempts => {
                // The provider's Retry-After is a floor, not a replacement: `Retry-After: 0`
                // must not burn the remaining attempts in a moment.
                let backoff = self.config.retry.jittered_delay_after(attempt);
                let delay = retry_after.map_or(backoff, |d| d.min(MAX_RETRY_AFTER).max(backoff));
                tracing::warn!(attempt, %error, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                let retry_at = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                match self.settle(&mut held, Settle::Retrying { error, retry_at }).await {
                    Ok(Settled::Superseded(Status::Delivered)) => self.ack(message, AckKind::Ack).await,
                    Ok(_) => {
                        self.wait(message, &intent, delay, &format!("retry:{}", held.entry.attempts)).await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the attempt; leaving the message unacknowledged");
                        return false;
                    }
                }
            }
            Err(DeliveryError::Transient { message: error, .. }) => {
                tracing::warn!(attempt, %error, "last attempt failed; dead-lettering");
                return self
                    .dead_letter(
                        message,
                        held,
                        Reason::AttemptsExhausted,
                        ErrorClass::Transient,
                        error,
                        false,
                    )
                    .await;
            }
            Err(DeliveryError::Permanent { message: error }) if !intent.fallback.is_empty() => {
                let why = format!("{} could not deliver it: {error}", self.channel);
                return self.hand_over(message, &intent, held, why).await;
            }
            Err(DeliveryError::Permanent { message: error }) => {
                tracing::warn!(attempt, %error, "refused for good; dead-lettering");
                return self
                    .dead_letter(message, held, Reason::Rejected, ErrorClass::Permanent, error, false)
                    .await;
            }
        }
        true
    }

    /// Whether a failed attempt only waited for open circuit breakers (no provider was called)
    /// and may wait again without spending an attempt: until the retry schedule's horizon has
    /// passed since the notification was accepted. After that each refusal counts, so a dead
    /// provider's notifications are dead-lettered on the usual schedule.
    fn waits_for_breaker(&self, intent: &Intent, held: &Held) -> bool {
        let refused_only =
            !held.calls.is_empty() && held.calls.iter().all(|c| c.failure == Some(FailureKind::CircuitOpen));
        let accepted = intent.created_at.unwrap_or(held.entry.created_at);
        let horizon = chrono::Duration::from_std(self.config.retry.horizon()).unwrap_or_default();
        refused_only && Utc::now() < accepted + horizon
    }

    /// Counts a notification's first attempt against its recipient's limit; the limit it goes
    /// over, if it does. A count that cannot be made lets the notification through: a limit is
    /// a courtesy to the user, not worth holding a delivery for.
    async fn over_limit(&self, intent: &Intent) -> Option<String> {
        let throttle = self.throttle.as_ref()?;
        match tokio::time::timeout(self.config.nats_timeout, throttle.over(intent, Utc::now())).await {
            Ok(Ok(over)) => over,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot count against the recipient's limit; sending");
                None
            }
            Err(_) => {
                tracing::warn!("counting against the recipient's limit timed out; sending");
                None
            }
        }
    }

    /// Records a decision not to send now (suppressed, skipped, or deferred with a scheduled
    /// copy for the end of the quiet hours), then acknowledges. The copy is stored before the
    /// decision, so a crash in between only schedules it twice under one message id.
    async fn decided(&self, message: &Message, intent: &Intent, mut held: Held, decided: Resolved) -> bool {
        let outcome = match decided {
            Resolved::Suppress(rule) => {
                tracing::info!(%rule, "suppressed by the user's preferences");
                Settle::Suppressed { rule }
            }
            Resolved::Skip(reason) if !intent.fallback.is_empty() => {
                return self.hand_over(message, intent, held, reason).await;
            }
            Resolved::Skip(reason) => {
                tracing::info!(%reason, "skipped: nothing to send it to");
                Settle::Skipped { reason }
            }
            Resolved::Defer { until, why } => {
                let id = format!("defer:{}:{}", held.key.kv_key(), until.timestamp());
                let mut headers = intent.headers();
                let subject = topology::schedule(&mut headers, intent, until);
                self.publish_held(subject, headers, intent, &id).await;
                tracing::info!(%until, "deferred for the user's quiet hours");
                Settle::Deferred { until, why }
            }
            Resolved::Throttle(limit) => {
                tracing::info!(%limit, "throttled: over the recipient's limit");
                Settle::Throttled { limit }
            }
            Resolved::Send(_) => unreachable!("sends are delivered"),
        };
        match self.settle(&mut held, outcome).await {
            Ok(_) => {
                self.ack(message, AckKind::Ack).await;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the decision; leaving the message unacknowledged");
                false
            }
        }
    }

    /// Records that the notification is being dead-lettered (unless `recorded`), parks the
    /// message, records the parking, then terminates the message — in that order, so a crash at
    /// any point parks it again on redelivery instead of sending it.
    async fn dead_letter(
        &self,
        message: &Message,
        mut held: Held,
        reason: Reason,
        error_class: ErrorClass,
        error: String,
        recorded: bool,
    ) -> bool {
        if !recorded {
            let parking = Settle::Parking { reason, error_class, error: error.clone() };
            match self.settle(&mut held, parking).await {
                Ok(Settled::Written) => {}
                Ok(Settled::Superseded(Status::Delivered)) => {
                    self.ack(message, AckKind::Ack).await;
                    return true;
                }
                Ok(Settled::Superseded(_)) => {
                    // Another handler took the notification over; the message comes back to it.
                    self.nak(message, self.config.retry.jittered_delay_after(1)).await;
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the dead letter; leaving the message unacknowledged");
                    return false;
                }
            }
        }
        let letter = DeadLetter {
            reason,
            error_class,
            attempts: held.entry.attempts,
            last_error: error,
            original_subject: message.subject.to_string(),
            original_sequence: held.sequence,
        };
        // The ledger says "parking": if this process dies meanwhile, the redelivery parks it and
        // never sends it.
        self.park_held(message, &letter).await;
        match self.settle(&mut held, Settle::Parked).await {
            Ok(_) => self.ack(message, AckKind::Term).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot record the parking; leaving the message unacknowledged")
            }
        }
        true
    }

    /// Lets `message` wait `delay` before it is handled again. A short wait is a `Nak` with that
    /// delay. A long one ([`LONG_WAIT`] or more: a retry's backoff, a direct publish's
    /// `send_at`) leaves the consumer: a copy is scheduled for then (message id
    /// `<step>:<ledger key>`, so a repeated publish is dropped) and the message is acknowledged,
    /// so waiting messages never fill the consumer's `max_ack_pending` and stop the channel for
    /// everyone (one dead receiver with thousands of queued retries did that).
    async fn wait(&self, message: &Message, intent: &Intent, delay: Duration, step: &str) {
        if delay < LONG_WAIT || !self.room_for_copies().await {
            return self.nak(message, delay).await;
        }
        let until = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let id = format!("{step}:{}", herald_shared::ledger::LedgerKey::of(intent).kv_key());
        let mut headers = intent.headers();
        let subject = topology::schedule(&mut headers, intent, until);
        self.publish_held(subject, headers, intent, &id).await;
        self.ack(message, AckKind::Ack).await;
    }

    /// Whether HERALD_INTENTS has room for scheduled copies: below [`COPIES_HIGH_WATER`]% of its
    /// `max_bytes` (looked up at most once a second). The stream discards its oldest messages
    /// when full, and those may be intents still waiting; above the mark waits stay `Nak`s.
    async fn room_for_copies(&self) -> bool {
        if let Some((at, room)) = *self.room.lock().expect("never poisoned")
            && at.elapsed() < Duration::from_secs(1)
        {
            return room;
        }
        let mut intents = self.topology.intents.clone();
        let room = match intents.info().await {
            Ok(info) => {
                let max = u64::try_from(info.config.max_bytes).unwrap_or(0);
                max > 0 && info.state.bytes * 100 < max * COPIES_HIGH_WATER
            }
            Err(_) => false,
        };
        *self.room.lock().expect("never poisoned") = Some((std::time::Instant::now(), room));
        room
    }

    /// Publishes `intent` on `subject` under message id `id`, holding the message being handled
    /// (retrying, with backoff) until JetStream stores it.
    async fn publish_held(
        &self,
        subject: String,
        mut headers: async_nats::HeaderMap,
        intent: &Intent,
        id: &str,
    ) {
        headers.insert(NATS_MESSAGE_ID, id);
        let payload: bytes::Bytes = intent.encode().into();
        let mut delay = Duration::from_millis(100);
        loop {
            let stored = async {
                self.topology
                    .js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
            };
            match stored.await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, %subject, "cannot store a copy of the message yet; holding it");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(HOLD_RETRY_MAX);
                }
            }
        }
    }

    /// This channel cannot deliver (the provider refused the address for good, or the user has
    /// none): the next channel of the user's fallback order takes over. Its intent is published
    /// (message id `fallback:<this ledger key>`) and recorded as accepted, then this channel is
    /// settled `skipped`, noting why and which channel took over.
    async fn hand_over(&self, message: &Message, intent: &Intent, mut held: Held, why: String) -> bool {
        let next = intent.fallback[0];
        let successor =
            Intent { channel: Some(next), fallback: intent.fallback[1..].to_vec(), ..intent.clone() };
        tracing::info!(%why, %next, "handing over to the user's next channel");
        let id = format!("fallback:{}", held.key.kv_key());
        // Through a schedule due now, like every intent a worker enqueues (retries, waits): a
        // worker never publishes on the intent subjects, so its NATS user may be denied them.
        // It fires within a second.
        let mut headers = successor.headers();
        let subject = topology::schedule(&mut headers, &successor, Utc::now());
        self.publish_held(subject, headers, &successor, &id).await;
        if let Err(e) = self.topology.ledger.accept(std::slice::from_ref(&successor)).await {
            tracing::warn!(error = %e, "cannot record the next channel as accepted; its worker will");
        }
        let reason = format!("{why}; {next} took over");
        match self.settle(&mut held, Settle::Skipped { reason }).await {
            Ok(_) => {
                self.ack(message, AckKind::Ack).await;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the hand-over; leaving the message unacknowledged");
                false
            }
        }
    }

    /// Stores an outcome in the ledger (retried until stored) and counts it.
    async fn settle(
        &self,
        held: &mut Held,
        outcome: Settle,
    ) -> Result<Settled, herald_shared::state::StateError> {
        let (name, latency) = match &outcome {
            Settle::Delivered => {
                let since = Utc::now() - held.entry.created_at;
                ("delivered", since.to_std().ok())
            }
            Settle::Retrying { .. } => ("retrying", None),
            Settle::Waiting { .. } => ("waiting", None),
            Settle::Parking { .. } => ("parking", None),
            Settle::Parked => ("dead_lettered", None),
            Settle::Suppressed { .. } => ("suppressed", None),
            Settle::Throttled { .. } => ("throttled", None),
            Settle::Deferred { .. } => ("deferred", None),
            Settle::Skipped { .. } => ("skipped", None),
        };
        // A dead letter is counted once it is parked, with the reason its parking recorded.
        let reason = match &outcome {
            Settle::Parked => held.entry.parking.as_ref().map(|p| p.reason.as_str()),
            _ => None,
        };
        let settled = self.topology.ledger.settle(held, outcome, UNTIL_STORED).await?;
        if settled == Settled::Written && name != "parking" {
            self.metrics.settled(self.channel, name, latency);
            if let Some(reason) = reason {
                self.metrics.dead_lettered(self.channel, reason);
            }
        }
        Ok(settled)
    }

    /// Acknowledges (or terminates) and waits for the server to confirm it. Unconfirmed, the
    /// message comes back and the ledger answers for it.
    async fn ack(&self, message: &Message, kind: AckKind) {
        if let Err(e) = message.double_ack_with(kind).await {
            tracing::warn!(error = %e, "acknowledgement not confirmed; the server may redeliver (the ledger knows the outcome)");
        }
    }

    async fn nak(&self, message: &Message, delay: Duration) {
        if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, "nak failed; the server will redeliver after the ack wait");
        }
    }
}
