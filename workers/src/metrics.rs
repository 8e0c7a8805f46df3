//! The workers' Prometheus metrics: every provider call, by channel and provider.
//!
//! - `herald_provider_calls_total{channel,provider}`: calls made (a breaker's refusal is no
//!   call).
//! - `herald_provider_failures_total{channel,provider,class}`: failures by
//!   [`FailureKind`] (`circuit_open` counts the refusals of an open breaker).
//! - `herald_provider_call_duration_seconds{channel,provider}`: latency of each call.
//! - `herald_provider_breakers_open{channel,provider}`: breakers open or probing (for webhooks,
//!   receiving hosts).
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

pub struct WorkerMetrics {
    registry: Registry,
    calls: Family<ProviderLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    latency: Family<ProviderLabels, Histogram>,
    breakers_open: Family<ProviderLabels, Gauge>,
}

fn labels(channel: Channel, provider: &str) -> ProviderLabels {
    ProviderLabels { channel: channel.to_string(), provider: provider.to_owned() }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald_provider");
        let calls = Family::<ProviderLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let latency = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        let breakers_open = Family::<ProviderLabels, Gauge>::default();
        registry.register("calls", "Calls made to a provider", calls.clone());
        registry.register("failures", "Failed provider calls, by failure class", failures.clone());
        registry.register_with_unit(
            "call_duration",
            "Latency of one provider call",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "breakers_open",
            "Circuit breakers open or probing (per provider; per receiving host for webhooks)",
            breakers_open.clone(),
        );
        WorkerMetrics { registry, calls, failures, latency, breakers_open }
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
