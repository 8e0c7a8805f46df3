//! Herald's channel workers.
//!
//! - [`channel`]: the loop every channel shares: a durable pull consumer, bounded in-flight
//!   work, decoding, the claim and settlement in the delivery ledger, progress acks, retries
//!   with `Nak(delay)`, dead-lettering, graceful shutdown.
//! - [`provider`]: the provider trait, and what every channel wraps around its providers:
//!   failover along an ordered list, rate limits, circuit breakers, timeouts, call records.
//! - [`channels`]: the one registry of channels: what each is made of.
//! - [`webhook`]: the webhook channel's provider: a signed JSON POST.
//! - [`email`]: the email channel's provider: SMTP (lettre), one per `HERALD_SMTP_URLS` entry.
//! - [`sms`]: the SMS channel's provider, Twilio, and SMS segment counting.
//! - [`push`]: the push channel: every device of the recipient through its platform's
//!   provider, [`fcm`] (FCM HTTP v1, OAuth2 service account) or [`apns`] (HTTP/2, ES256
//!   provider tokens); unregistered devices are removed from the user.
//! - [`metrics`]: the provider metrics, and `/metrics` for `herald worker`.
//! - [`resolve`]: notifications by user and template made concrete at send time from the
//!   local copies of users and templates: address, preferences, rendering.
//! - [`park`]: copying a message into HERALD_DLQ (always before it is terminated).
//! - [`mover`]: the advisory consumer that dead-letters intents the server stopped
//!   redelivering (a worker died holding them on their last attempt).
//!
//! A channel's delivery code implements [`Deliver`] and says, through [`DeliveryError`],
//! whether a failure is transient (retry) or permanent (dead-letter now), with a record of the
//! provider calls it made. Workers never call the gateway.

pub mod apns;
pub mod channel;
pub mod channels;
pub mod email;
pub mod fcm;
pub mod metrics;
pub mod mover;
pub mod park;
pub mod provider;
pub mod push;
pub mod resolve;
pub mod sms;
pub mod webhook;

use std::{future::Future, sync::Arc, time::Duration};

use herald_shared::{
    Config, Intent,
    mirror::Mirror,
    topology::{Lane, TEMPLATES_BUCKET, Topology, USERS_BUCKET},
};
use tokio::sync::watch;

/// Why a delivery attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying: timeouts, connection errors, 408, 429, 5xx.
    #[error("{message}")]
    Transient {
        message: String,
        /// The provider asked to wait this long (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: the provider refused the request.
    #[error("{message}")]
    Permanent { message: String },
}

/// What one attempt on a channel came to, and the provider calls it made.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub result: Result<(), DeliveryError>,
    pub calls: Vec<herald_shared::state::ProviderCall>,
}

impl Delivery {
    /// An attempt that ended before any provider was called.
    pub fn failed(error: DeliveryError) -> Delivery {
        Delivery { result: Err(error), calls: Vec::new() }
    }
}

/// One attempt to deliver on a channel.
pub trait Deliver: Send + Sync + 'static {
    fn deliver<'a>(&'a self, intent: &'a Intent) -> impl Future<Output = Delivery> + Send + 'a;
}

/// How often the channel consumers' figures are read for `/metrics`.
const CONSUMER_FIGURES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads every channel consumer's pending, ack-pending and redelivered counts into `metrics`
/// until `stop`.
async fn watch_consumers(
    topology: Topology,
    channels: Vec<herald_shared::Channel>,
    metrics: Arc<metrics::WorkerMetrics>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        for &channel in &channels {
            for lane in Lane::ALL {
                let name = herald_shared::topology::lane_consumer(channel, lane);
                if let Ok(info) = topology.intents.consumer_info(&name).await {
                    metrics.consumer(&name, info.num_pending, info.num_ack_pending, info.num_redelivered);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CONSUMER_FIGURES_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Runs the workers of `config.channels` and the dead-letter mover until `shutdown` completes,
/// then lets in-flight deliveries finish. Provider calls are counted in `provider_metrics`.
pub async fn run(
    config: Config,
    topology: Topology,
    provider_metrics: Arc<metrics::WorkerMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Users and templates are read from local copies only; they follow the buckets from where
    // they stopped, and serve from disk while NATS is away.
    let users = Arc::new(Mirror::open(&config.data_dir, "users")?);
    let templates = Arc::new(Mirror::open(&config.data_dir, "templates")?);
    let mut followers = vec![
        tokio::spawn(users.clone().follow(topology.js.clone(), USERS_BUCKET.to_owned())),
        tokio::spawn(templates.clone().follow(topology.js.clone(), TEMPLATES_BUCKET.to_owned())),
    ];
    let resolver = Arc::new(resolve::Resolver::new(
        users,
        templates,
        config.default_locale.clone(),
        config.required_categories.clone(),
    ));
    for &channel in &config.channels {
        // One sender per channel: the lanes share its providers, rate limits and breakers.
        let sender = Arc::new(channels::build(channel, &config, &topology, provider_metrics.clone())?);
        provider_metrics.declare_channel(channel);
        for lane in Lane::ALL {
            let worker = channel::ChannelWorker::new(
                channel,
                lane,
                config.clone(),
                topology.clone(),
                sender.clone(),
                resolver.clone(),
                provider_metrics.clone(),
            );
            tasks.spawn(worker.run(stop_rx.clone()));
        }
    }
    tasks.spawn(mover::run(topology.clone(), config.retry.max_attempts, stop_rx.clone()));
    tasks.spawn(watch_consumers(
        topology.clone(),
        config.channels.clone(),
        provider_metrics.clone(),
        stop_rx.clone(),
    ));
    shutdown.await;
    tracing::info!("stopping workers: no new messages, finishing in-flight deliveries");
    let _ = stop_tx.send(true);
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    for f in followers.drain(..) {
        f.abort();
    }
    Ok(())
}
