//! The gateway's Prometheus metrics, served as text on `GET /metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CopyLabel {
    pub copy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Counters and histograms updated on the accept path.
pub struct Metrics {
    registry: Registry,
    /// Intents stored, per channel.
    pub accepted: Family<ChannelLabel, Counter>,
    /// Requests answered as duplicates of an earlier `Idempotency-Key`.
    pub duplicates: Counter,
    /// Requests refused, by error code.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Time from the first publish to the last JetStream ack of a request.
    pub publish_seconds: Histogram,
    /// Changes of `herald_users` not yet in the local copy (set when `/metrics` is read), so an
    /// alert can fire on a copy that stopped following.
    pub users_copy_lag: Gauge,
    /// The same for every local copy this process follows (in `herald up` the workers' copies
    /// of users and templates too), by file.
    pub copy_lag: Family<CopyLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald_gateway");
        let accepted = Family::<ChannelLabel, Counter>::default();
        let duplicates = Counter::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let publish_seconds =
            Histogram::new([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]);
        registry.register("accepted", "Intents stored in JetStream, per channel", accepted.clone());
        registry.register(
            "duplicates",
            "Requests answered as duplicates of an earlier Idempotency-Key",
            duplicates.clone(),
        );
        registry.register("rejected", "Requests refused, by error code", rejected.clone());
        registry.register(
            "publish_seconds",
            "JetStream publish latency of one request (first publish to last ack)",
            publish_seconds.clone(),
        );
        let users_copy_lag = Gauge::default();
        registry.register(
            "users_copy_lag",
            "Changes of the herald_users bucket not yet applied to the local redb copy",
            users_copy_lag.clone(),
        );
        let copy_lag = Family::<CopyLabel, Gauge>::default();
        registry.register(
            "copy_lag",
            "Changes of a bucket not yet applied to a local redb copy of this process, by copy",
            copy_lag.clone(),
        );
        Metrics { registry, accepted, duplicates, rejected, publish_seconds, users_copy_lag, copy_lag }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &str) {
        self.rejected.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
