//! The workers' Prometheus metrics: every provider call, by channel and provider, and what the
//! channel workers did with each intent.
//!
//! - `herald_provider_calls_total{channel,provider}`: calls made (a breaker's refusal is no
//!   call).
//! - `herald_provider_failures_total{channel,provider,class}`: failures by
//!   [`FailureKind`] (`circuit_open` counts the refusals of an open breaker).
//! - `herald_provider_call_duration_seconds{channel,provider}`: latency of each call.
//! - `herald_provider_breakers_open{channel,provider}`: breakers open or probing (for webhooks,
//!   receiving hosts).
//!
//!
//! And what the channel workers did with the intents they took (labels `channel`, and where
//! said `outcome`, `reason` or `consumer`):
//! - `herald_intents_received_total`: intents taken from a channel's consumers for the first
//!   time (not redeliveries, nor the copies that carry a long wait).
//! - `herald_redeliveries_total`: messages delivered again (a retry's `Nak`, an expired ack wait).
//! - `herald_attempts_total`: sends that reached the providers; `herald_retries_total`: those
//!   failed and retried.
//! - `herald_outcomes_total{outcome}`: settled outcomes (`delivered`, `retrying`,
//!   `dead_lettered`, `suppressed`, `deferred`, `skipped`, `throttled`, `waiting`).
//! - `herald_delivery_latency_seconds`: from acceptance to the provider's acknowledgement.
//! - `herald_dead_letters_total{reason}`: intents parked in HERALD_DLQ, by reason.
//! - `herald_consumer_pending_messages{consumer}`, `herald_consumer_ack_pending_messages`,
//!   `herald_consumer_redelivered_messages`: each channel consumer's figures from JetStream,
//!   read every few seconds.
//!
//! The failure ratio by class is `herald_provider_failures_total{class}` over
//! `herald_provider_calls_total`.
//!
//! `herald up` shows them on the gateway's `/metrics`; `herald worker` serves them on
//! `HERALD_METRICS_ADDR`.

use std::{sync::Arc, time::Duration};

use herald_shared::{Channel, state::FailureKind};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub channel: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub channel: String,
    pub provider: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub channel: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub channel: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

pub struct WorkerMetrics {
    registry: Registry,
    calls: Family<ProviderLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    latency: Family<ProviderLabels, Histogram>,
    breakers_open: Family<ProviderLabels, Gauge>,
    received: Family<ChannelLabels, Counter>,
    redeliveries: Family<ChannelLabels, Counter>,
    attempts: Family<ChannelLabels, Counter>,
    retries: Family<ChannelLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    delivery_latency: Family<ChannelLabels, Histogram>,
    dead_letters: Family<ReasonLabels, Counter>,
    consumer_pending: Family<ConsumerLabels, Gauge>,
    consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    consumer_redelivered: Family<ConsumerLabels, Gauge>,
}

fn channel_label(channel: Channel) -> ChannelLabels {
    ChannelLabels { channel: channel.to_string() }
}

fn labels(channel: Channel, provider: &str) -> ProviderLabels {
    ProviderLabels { channel: channel.to_string(), provider: provider.to_owned() }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let calls = Family::<ProviderLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let latency = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        let breakers_open = Family::<ProviderLabels, Gauge>::default();
        let provider = registry.sub_registry_with_prefix("provider");
        provider.register("calls", "Calls made to a provider", calls.clone());
        provider.register("failures", "Failed provider calls, by failure class", failures.clone());
        provider.register_with_unit(
            "call_duration",
            "Latency of one provider call",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        provider.register(
            "breakers_open",
            "Circuit breakers open or probing (per provider; per receiving host for webhooks)",
            breakers_open.clone(),
        );
        let received = Family::<ChannelLabels, Counter>::default();
        let redeliveries = Family::<ChannelLabels, Counter>::default();
        let attempts = Family::<ChannelLabels, Counter>::default();
        let retries = Family::<ChannelLabels, Counter>::default();
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let delivery_latency = Family::<ChannelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
            ])
        });
        let dead_letters = Family::<ReasonLabels, Counter>::default();
        let consumer_pending = Family::<ConsumerLabels, Gauge>::default();
        let consumer_ack_pending = Family::<ConsumerLabels, Gauge>::default();
        let consumer_redelivered = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "intents_received",
            "Intents taken from a channel's consumers for the first time",
            received.clone(),
        );
        registry.register(
            "redeliveries",
            "Messages a channel's consumers delivered again",
            redeliveries.clone(),
        );
        registry.register("attempts", "Sends that reached a channel's providers", attempts.clone());
        registry.register("retries", "Failed sends that will be tried again", retries.clone());
        registry.register("outcomes", "Settled outcomes of deliveries, by outcome", outcomes.clone());
        registry.register_with_unit(
            "delivery_latency",
            "From acceptance to the provider's acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            delivery_latency.clone(),
        );
        registry.register("dead_letters", "Intents parked in HERALD_DLQ, by reason", dead_letters.clone());
        registry.register(
            "consumer_pending_messages",
            "Messages a channel consumer has yet to deliver",
            consumer_pending.clone(),
        );
        registry.register(
            "consumer_ack_pending_messages",
            "Messages a channel consumer delivered and awaits the acknowledgement of",
            consumer_ack_pending.clone(),
        );
        registry.register(
            "consumer_redelivered_messages",
            "Messages a channel consumer is delivering again",
            consumer_redelivered.clone(),
        );
        WorkerMetrics {
            registry,
            calls,
            failures,
            latency,
            breakers_open,
            received,
            redeliveries,
            attempts,
            retries,
            outcomes,
            delivery_latency,
            dead_letters,
            consumer_pending,
            consumer_ack_pending,
            consumer_redelivered,
        }
    }
}

impl WorkerMetrics {
    pub fn called(&self, channel: Channel, provider: &str, latency: Duration) {
        let l = labels(channel, provider);
        self.calls.get_or_create(&l).inc();
        self.latency.get_or_create(&l).observe(latency.as_secs_f64());
    }

    pub fn failed(&self, channel: Channel, provider: &str, kind: FailureKind) {
        let l = FailureLabels {
            channel: channel.to_string(),
            provider: provider.to_owned(),
            class: kind.to_string(),
        };
        self.failures.get_or_create(&l).inc();
    }

    pub fn set_open_breakers(&self, channel: Channel, provider: &str, open: usize) {
        self.breakers_open.get_or_create(&labels(channel, provider)).set(open as i64);
    }

    /// A message taken from `channel`'s consumer: new, or delivered again.
    pub fn taken(&self, channel: Channel, first: bool) {
        let family = if first { &self.received } else { &self.redeliveries };
        family.get_or_create(&channel_label(channel)).inc();
    }

    /// A send that reached the providers.
    pub fn attempted(&self, channel: Channel) {
        self.attempts.get_or_create(&channel_label(channel)).inc();
    }

    /// A settled outcome; `latency` (acceptance to acknowledgement) for deliveries.
    pub fn settled(&self, channel: Channel, outcome: &str, latency: Option<Duration>) {
        let label = OutcomeLabels { channel: channel.to_string(), outcome: outcome.to_owned() };
        self.outcomes.get_or_create(&label).inc();
        if outcome == "retrying" {
            self.retries.get_or_create(&channel_label(channel)).inc();
        }
        if let Some(l) = latency {
            self.delivery_latency.get_or_create(&channel_label(channel)).observe(l.as_secs_f64());
        }
    }

    /// An intent parked in the DLQ for `reason`.
    pub fn dead_lettered(&self, channel: Channel, reason: &str) {
        let label = ReasonLabels { channel: channel.to_string(), reason: reason.to_owned() };
        self.dead_letters.get_or_create(&label).inc();
    }

    /// A channel consumer's figures from JetStream.
    pub fn consumer(&self, name: &str, pending: u64, ack_pending: usize, redelivered: usize) {
        let label = ConsumerLabels { consumer: name.to_owned() };
        self.consumer_pending.get_or_create(&label).set(pending as i64);
        self.consumer_ack_pending.get_or_create(&label).set(ack_pending as i64);
        self.consumer_redelivered.get_or_create(&label).set(redelivered as i64);
    }

    /// Makes every series of a channel visible from the start.
    pub fn declare_channel(&self, channel: Channel) {
        let l = channel_label(channel);
        for family in [&self.received, &self.redeliveries, &self.attempts, &self.retries] {
            let _ = family.get_or_create(&l);
        }
        let _ = self.delivery_latency.get_or_create(&l);
    }

    /// Makes every series of `provider` visible from the start (zero until something happens).
    pub fn declare(&self, channel: Channel, provider: &str) {
        let l = labels(channel, provider);
        let _ = self.calls.get_or_create(&l);
        let _ = self.breakers_open.get_or_create(&l);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `metrics` on `GET /metrics` from `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<WorkerMetrics>) -> anyhow::Result<()> {
    use poem::{EndpointExt, Route, get, handler, listener::TcpAcceptor, web::Data};

    #[handler]
    fn render(metrics: Data<&Arc<WorkerMetrics>>) -> String {
        herald_shared::telemetry::join_metrics([metrics.render()])
    }
    let app = Route::new().at("/metrics", get(render)).data(metrics).map_to_response();
    tracing::info!(addr = %listener.local_addr()?, "serving worker metrics on /metrics");
    poem::Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?).run(app).await?;
    Ok(())
}
