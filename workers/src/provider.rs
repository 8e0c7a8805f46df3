//! Providers, and what every channel wraps around them.
//!
//! A provider adapter (SMTP, Twilio, FCM, APNs, the webhook POST) implements [`Provider`]: one
//! call that sends one message to one address and says, as a [`FailureKind`], how it failed.
//! Adding a provider is one file with one `impl Provider`.
//!
//! [`Chain`] is the one place that turns those calls into an attempt, the same for every
//! channel:
//! - an ordered list of providers: a transient failure (or an open breaker) moves on to the next
//!   one, a permanent failure ends the attempt (the message, not the provider, is at fault);
//! - a token bucket per provider (`HERALD_PROVIDER_RATES`), waited on before each call;
//! - a circuit breaker per provider, or per receiving host for webhooks
//!   ([`Provider::breaker_key`]): `HERALD_BREAKER` consecutive failures that say the provider is
//!   unwell ([`FailureKind::trips_breaker`]) open it; while open, calls fail at once as
//!   `circuit_open` (the worker retries them with its backoff, at least until the breaker's
//!   probe is due), holding no delivery slot; after the open period one probe goes through, and
//!   its outcome closes or reopens the breaker;
//! - a timeout per call (`HERALD_SEND_TIMEOUT`);
//! - a [`ProviderCall`] record of every call and the provider metrics.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use herald_shared::{
    Channel, Intent,
    config::{BreakerPolicy, Rate},
    state::{FailureKind, ProviderCall},
};

use crate::{DeliveryError, metrics::WorkerMetrics};

/// The future of one provider call.
pub type Sending<'a> = Pin<Box<dyn Future<Output = Result<Receipt, ProviderError>> + Send + 'a>>;

/// One provider: sends one message to one address.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name in configuration, metrics and records: `smtp`, `smtp-2`, `twilio`,
    /// `fcm`, `apns`, `webhook`.
    fn name(&self) -> &str;

    /// The circuit breaker a call to `to` counts against, when it is not the provider's own
    /// (webhooks: the receiving host, so one dead receiver opens only its own breaker).
    fn breaker_key(&self, _to: &str) -> Option<String> {
        None
    }

    /// Sends `intent` (content rendered, addresses filled in) to `to`: the channel's address
    /// (a mailbox, an E.164 number, a device token, a webhook URL).
    fn send<'a>(&'a self, intent: &'a Intent, to: &'a str) -> Sending<'a>;
}

/// What a provider answered to a message it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Receipt {
    /// The provider's id for the message.
    pub provider_message_id: Option<String>,
    /// Anything else worth recording (SMS: segments and encoding).
    pub detail: Option<String>,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: FailureKind,
    /// What the provider said, for `last_error` and the dead letter. Never a secret.
    pub message: String,
    /// The provider asked to wait this long (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The provider says the device token is gone for good (FCM `UNREGISTERED`, APNs
    /// `BadDeviceToken`, `Unregistered`): push removes it from the user.
    pub device_gone: bool,
}

impl ProviderError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> ProviderError {
        ProviderError { kind, message: message.into(), retry_after: None, device_gone: false }
    }

    /// Marks the failure as a device the provider no longer knows.
    pub fn device_gone(mut self) -> ProviderError {
        self.device_gone = true;
        self
    }

    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> ProviderError {
        self.retry_after = retry_after;
        self
    }
}

impl From<ProviderError> for DeliveryError {
    fn from(e: ProviderError) -> DeliveryError {
        if e.kind.is_transient() {
            DeliveryError::Transient { message: e.message, retry_after: e.retry_after }
        } else {
            DeliveryError::Permanent { message: e.message }
        }
    }
}

/// The HTTP client every HTTP provider of `channel` starts from: its timeout
/// (`HERALD_SEND_TIMEOUT`, connecting in at most 5 s of it), no redirects (a POST must reach
/// its URL), Herald's user agent, and an idle pool as large as the channel's concurrency.
pub fn http_client(config: &herald_shared::Config, channel: Channel) -> reqwest::ClientBuilder {
    let timeout = config.send_timeout.for_channel(channel);
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(config.send_concurrency.for_channel(channel))
}

/// An ordered list of providers for one channel (or, for push, one platform), with their rate
/// limits and breakers.
pub struct Chain {
    channel: Channel,
    links: Vec<Link>,
    timeout: Duration,
    metrics: Arc<WorkerMetrics>,
}

struct Link {
    provider: Arc<dyn Provider>,
    bucket: Option<TokenBucket>,
    breakers: Breakers,
}

impl Chain {
    /// `providers` in order of preference; rates and breakers come from the configuration.
    pub fn new(
        channel: Channel,
        providers: Vec<Arc<dyn Provider>>,
        config: &herald_shared::Config,
        metrics: Arc<WorkerMetrics>,
    ) -> Chain {
        let links = providers
            .into_iter()
            .map(|provider| Link {
                bucket: config.providers.rate(provider.name()).map(TokenBucket::new),
                breakers: Breakers::new(config.providers.breaker),
                provider,
            })
            .collect();
        Chain { channel, links, timeout: config.send_timeout.for_channel(channel), metrics }
    }

    /// The names of the providers, in order.
    pub fn names(&self) -> Vec<String> {
        self.links.iter().map(|l| l.provider.name().to_owned()).collect()
    }

    /// One attempt: the providers in turn until one takes the message or one refuses it for
    /// good. Returns the outcome and a record of every call (`device` labels push calls).
    pub async fn send(
        &self,
        intent: &Intent,
        to: &str,
        device: Option<&str>,
    ) -> (Result<Receipt, ProviderError>, Vec<ProviderCall>) {
        let mut calls = Vec::new();
        let mut last = None;
        for link in &self.links {
            let name = link.provider.name();
            let key = link.provider.breaker_key(to).unwrap_or_else(|| name.to_owned());
            let probe = match link.breakers.admit(&key) {
                Admit::Go { probe } => probe,
                Admit::Refuse { retry_after } => {
                    let e = ProviderError::new(
                        FailureKind::CircuitOpen,
                        format!("{name}: circuit open for {key} (too many failures in a row); next probe in {} ms", retry_after.as_millis()),
                    )
                    .with_retry_after(Some(retry_after));
                    self.metrics.failed(self.channel, name, FailureKind::CircuitOpen);
                    calls.push(call(name, device, Duration::ZERO, Err(&e)));
                    last = Some(e);
                    continue;
                }
            };
            if let Some(bucket) = &link.bucket {
                bucket.take().await;
            }
            let started = Instant::now();
            // One span per provider call: a trace shows each attempt's calls and their latency.
            let span = tracing::info_span!("provider_call", provider = name, channel = %self.channel);
            let sending = tracing::Instrument::instrument(link.provider.send(intent, to), span);
            let result = match tokio::time::timeout(self.timeout, sending).await {
                Ok(r) => r,
                Err(_) => Err(ProviderError::new(
                    FailureKind::Timeout,
                    format!("{name}: timed out after {} ms", self.timeout.as_millis()),
                )),
            };
            let latency = started.elapsed();
            self.metrics.called(self.channel, name, latency);
            let change = match &result {
                Ok(_) => link.breakers.succeeded(&key, probe),
                Err(e) if e.kind.trips_breaker() => link.breakers.failed(&key, probe),
                // The provider answered: it is up, whatever it thought of this message.
                Err(e) if e.kind != FailureKind::RateLimited => link.breakers.succeeded(&key, probe),
                Err(_) => link.breakers.released(&key, probe),
            };
            match change {
                Some(true) => {
                    tracing::warn!(channel = %self.channel, provider = name, breaker = %key, "circuit breaker opened");
                }
                Some(false) => {
                    tracing::info!(channel = %self.channel, provider = name, breaker = %key, "circuit breaker closed");
                }
                None => {}
            }
            if change.is_some() {
                // Counted only when a breaker opens or closes: a webhook chain may hold
                // thousands of hosts' breakers, too many to count on every call.
                self.metrics.set_open_breakers(self.channel, name, link.breakers.open_count());
            }
            if let Err(e) = &result {
                self.metrics.failed(self.channel, name, e.kind);
            }
            calls.push(call(name, device, latency, result.as_ref()));
            match result {
                Ok(receipt) => return (Ok(receipt), calls),
                Err(e) if e.kind.is_transient() => last = Some(e),
                Err(e) => return (Err(e), calls),
            }
        }
        let e = last.unwrap_or_else(|| ProviderError::new(FailureKind::Rejected, "no provider configured"));
        (Err(e), calls)
    }
}

fn call(
    provider: &str,
    device: Option<&str>,
    latency: Duration,
    result: Result<&Receipt, &ProviderError>,
) -> ProviderCall {
    ProviderCall {
        provider: provider.to_owned(),
        provider_message_id: result.ok().and_then(|r| r.provider_message_id.clone()),
        latency_ms: latency.as_millis() as u64,
        failure: result.err().map(|e| e.kind),
        error: result.err().map(|e| e.message.clone()),
        device: device.map(device_label),
        detail: result.ok().and_then(|r| r.detail.clone()),
    }
}

/// How a device appears in records and logs: the last 8 characters of its token.
pub fn device_label(token: &str) -> String {
    let start = token.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
    format!("…{}", &token[start..])
}

/// What a breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admit {
    /// Call. `probe`: this call is the one probe of a half-open breaker.
    Go { probe: bool },
    /// Fail at once; the probe is due in `retry_after`.
    Refuse { retry_after: Duration },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The open period is over and one probe is out.
    Probing,
}

/// The circuit breakers of one provider, by key.
pub struct Breakers {
    policy: BreakerPolicy,
    states: Mutex<HashMap<String, State>>,
}

/// Most keys a provider keeps breakers for; healthy ones are forgotten first.
const MAX_BREAKERS: usize = 10_000;

impl Breakers {
    pub fn new(policy: BreakerPolicy) -> Breakers {
        Breakers { policy, states: Mutex::new(HashMap::new()) }
    }

    pub fn admit(&self, key: &str) -> Admit {
        let mut states = self.states.lock().expect("never poisoned");
        match states.get(key).copied() {
            None | Some(State::Closed { .. }) => Admit::Go { probe: false },
            Some(State::Open { until }) => {
                let now = Instant::now();
                if now >= until {
                    states.insert(key.to_owned(), State::Probing);
                    Admit::Go { probe: true }
                } else {
                    Admit::Refuse { retry_after: until - now }
                }
            }
            // Another call is probing; try again after a moment.
            Some(State::Probing) => Admit::Refuse { retry_after: Duration::from_secs(1) },
        }
    }

    /// Records a success. Returns `Some(false)` when that closed the breaker.
    pub fn succeeded(&self, key: &str, probe: bool) -> Option<bool> {
        let mut states = self.states.lock().expect("never poisoned");
        let was = states.remove(key);
        (probe || matches!(was, Some(State::Probing | State::Open { .. }))).then_some(false)
    }

    /// Records a failure that counts. Returns `Some(true)` when that opened the breaker.
    pub fn failed(&self, key: &str, probe: bool) -> Option<bool> {
        let mut states = self.states.lock().expect("never poisoned");
        if states.len() >= MAX_BREAKERS && !states.contains_key(key) {
            states.retain(|_, s| !matches!(s, State::Closed { .. }));
        }
        let open = State::Open { until: Instant::now() + self.policy.open_for };
        let state = states.entry(key.to_owned()).or_insert(State::Closed { failures: 0 });
        match *state {
            State::Closed { failures } if failures + 1 >= self.policy.failures => {
                *state = open;
                Some(true)
            }
            State::Closed { failures } => {
                *state = State::Closed { failures: failures + 1 };
                None
            }
            State::Probing if probe => {
                *state = open;
                Some(true)
            }
            // A call admitted before the breaker opened, finishing late.
            State::Probing | State::Open { .. } => None,
        }
    }

    /// A probe whose answer says nothing about the provider's health (it asked to slow down):
    /// let the next call probe again.
    pub fn released(&self, key: &str, probe: bool) -> Option<bool> {
        if probe {
            let mut states = self.states.lock().expect("never poisoned");
            states.insert(key.to_owned(), State::Open { until: Instant::now() });
        }
        None
    }

    /// How many of this provider's breakers are open (or probing).
    pub fn open_count(&self) -> usize {
        let states = self.states.lock().expect("never poisoned");
        states.values().filter(|s| !matches!(s, State::Closed { .. })).count()
    }
}

/// A token bucket holding one second's worth of sends (at least one). Callers queue in order:
/// each takes the next token, waiting until it is due.
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: Rate) -> TokenBucket {
        let capacity = rate.per_second.max(1.0);
        TokenBucket { rate: rate.per_second, capacity, state: Mutex::new((capacity, Instant::now())) }
    }

    /// How long the caller must wait for its token (the token is taken now).
    pub fn reserve(&self) -> Duration {
        let mut state = self.state.lock().expect("never poisoned");
        let now = Instant::now();
        let (tokens, at) = *state;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.capacity) - 1.0;
        *state = (tokens, now);
        if tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-tokens / self.rate) }
    }

    pub async fn take(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy { failures: 3, open_for: Duration::from_millis(50) }
    }

    #[test]
    fn a_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() {
        let b = Breakers::new(policy());
        assert_eq!(b.failed("h", false), None);
        assert_eq!(b.succeeded("h", false), None, "a success resets the count");
        assert_eq!(b.failed("h", false), None);
        assert_eq!(b.failed("h", false), None);
        assert_eq!(b.failed("h", false), Some(true));
        assert!(matches!(b.admit("h"), Admit::Refuse { .. }));
        assert_eq!(b.admit("other"), Admit::Go { probe: false }, "keys are independent");
        assert_eq!(b.open_count(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit("h"), Admit::Go { probe: true });
        assert!(matches!(b.admit("h"), Admit::Refuse { .. }), "one probe at a time");
        assert_eq!(b.failed("h", true), Some(true), "a failed probe reopens it");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit("h"), Admit::Go { probe: true });
        assert_eq!(b.succeeded("h", true), Some(false));
        assert_eq!(b.admit("h"), Admit::Go { probe: false });
        assert_eq!(b.open_count(), 0);
    }

    #[test]
    fn a_rate_limited_probe_lets_the_next_call_probe() {
        let b = Breakers::new(BreakerPolicy { failures: 1, open_for: Duration::from_millis(10) });
        b.failed("h", false);
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(b.admit("h"), Admit::Go { probe: true });
        b.released("h", true);
        assert_eq!(b.admit("h"), Admit::Go { probe: true });
    }

    #[test]
    fn a_token_bucket_spaces_calls_at_its_rate() {
        let bucket = TokenBucket::new(Rate { per_second: 10.0, burst: 10.0 });
        let waits: Vec<Duration> = (0..15).map(|_| bucket.reserve()).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()), "a second's worth at once: {waits:?}");
        // The 11th waits about 100 ms, the 15th about 500 ms.
        assert!(
            waits[10] > Duration::from_millis(80) && waits[10] <= Duration::from_millis(100),
            "{waits:?}"
        );
        assert!(
            waits[14] > Duration::from_millis(480) && waits[14] <= Duration::from_millis(500),
            "{waits:?}"
        );
    }

    #[test]
    fn devices_are_labelled_by_their_last_characters() {
        assert_eq!(device_label("abcdefghijkl"), "…efghijkl");
        assert_eq!(device_label("short"), "…short");
    }
}
