//! Every stream, consumer and bucket Herald uses, declared once and ensured at start.
//!
//! Services call [`ensure`] when they start; it creates what is missing and updates what changed
//! (for example the duplicate window), so a fresh nats-server and an upgraded deployment both end
//! up with the same layout. Nothing else in Herald names a stream, consumer or bucket.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{
    config::{Config, RetryPolicy},
    intent::Channel,
    state::{Notifications, Outcome},
};

pub const INTENTS_STREAM: &str = "HERALD_INTENTS";
pub const STATUS_STREAM: &str = "HERALD_STATUS";
pub const DLQ_STREAM: &str = "HERALD_DLQ";
pub const ADVISORIES_STREAM: &str = "HERALD_ADVISORIES";
pub const NOTIFICATIONS_BUCKET: &str = "herald_notifications";
/// The durable consumer on HERALD_ADVISORIES that moves max-delivered intents to the DLQ.
pub const DLQ_MOVER_CONSUMER: &str = "dlq_mover";
/// A scratch stream the benchmark publishes to for the raw JetStream rate; deleted after.
pub const BENCH_STREAM: &str = "HERALD_BENCH";
pub const BENCH_SUBJECT: &str = "herald.bench";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long HERALD_INTENTS keeps a message (a pending schedule included).
pub const INTENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The furthest `send_at` the gateway accepts: a day short of [`INTENTS_MAX_AGE`], so a
/// schedule always fires before the stream would drop it.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(6 * 24 * 3600);

/// `herald.intent.<channel>`: where intents are published.
pub fn intent_subject(channel: Channel) -> String {
    format!("herald.intent.{channel}")
}

/// `herald.schedule.<channel>.<id>`: the schedule that fires an intent at `send_at`.
pub fn schedule_subject(channel: Channel, id: &str) -> String {
    format!("herald.schedule.{channel}.{id}")
}

/// `herald.status.<channel>.<outcome>`.
pub fn status_subject(channel: Channel, outcome: Outcome) -> String {
    format!("herald.status.{channel}.{outcome}")
}

/// `herald.dlq.<channel>`.
pub fn dlq_subject(channel: Channel) -> String {
    format!("herald.dlq.{channel}")
}

/// The advisory subjects HERALD_ADVISORIES keeps (nobody else listens, and the server drops
/// advisories nobody listens to).
pub fn advisory_subjects() -> Vec<String> {
    ["MAX_DELIVERIES", "MSG_TERMINATED", "MSG_NAKED"]
        .iter()
        .map(|kind| format!("$JS.EVENT.ADVISORY.CONSUMER.{kind}.{INTENTS_STREAM}.>"))
        .collect()
}

pub fn intents_stream_config(duplicate_window: Duration, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: INTENTS_STREAM.into(),
        description: Some("notification intents, one message per notification and channel".into()),
        subjects: vec!["herald.intent.*".into(), "herald.schedule.*.*".into()],
        // Limits, not WorkQueue: the ids of acked messages must survive a server restart for
        // the duplicate window to hold (see NATS-NOTES).
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: INTENTS_MAX_AGE,
        duplicate_window,
        allow_direct: true,
        allow_message_schedules: true,
        ..Default::default()
    }
}

fn status_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: STATUS_STREAM.into(),
        description: Some("one event per delivery attempt".into()),
        subjects: vec!["herald.status.>".into()],
        storage: StorageType::File,
        max_age: 7 * DAY,
        ..Default::default()
    }
}

fn dlq_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: DLQ_STREAM.into(),
        description: Some("dead letters: the original intent plus why it was parked".into()),
        subjects: vec!["herald.dlq.>".into()],
        storage: StorageType::File,
        // Kept until an operator replays or discards them.
        discard: DiscardPolicy::Old,
        // Long enough that a worker and the advisory mover parking the same message, even
        // minutes apart, store it once (dead letters are few, so the ids cost little).
        duplicate_window: Duration::from_secs(3600),
        allow_direct: true,
        ..Default::default()
    }
}

fn advisories_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: ADVISORIES_STREAM.into(),
        description: Some("consumer advisories about HERALD_INTENTS".into()),
        subjects: advisory_subjects(),
        storage: StorageType::File,
        max_age: 7 * DAY,
        ..Default::default()
    }
}

fn notifications_bucket_config(replicas: usize) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        bucket: NOTIFICATIONS_BUCKET.into(),
        description: "notification id -> per-channel status".into(),
        history: 1,
        max_age: 30 * DAY,
        storage: StorageType::File,
        ..Default::default()
    }
}

pub fn bench_stream_config() -> stream::Config {
    stream::Config {
        name: BENCH_STREAM.into(),
        subjects: vec![BENCH_SUBJECT.into()],
        storage: StorageType::File,
        ..intents_stream_config(Duration::from_secs(120), 1)
    }
}

/// The durable pull consumer of one channel.
///
/// `max_deliver` is the retry policy's attempt count. The `backoff` list only matters when a
/// worker dies holding a message (ack-wait expiry). Each step is at least twice the longest a
/// live worker can hold a message — one whole handling (ledger read, send, record, each bounded
/// by `nats_timeout` or `send_timeout`) — plus a second: a message can also wait in the pull
/// buffer for one handling before its own starts, and must not be redelivered underneath a
/// live worker. Transient failures are retried with `Nak(delay)` by the worker.
pub fn channel_consumer_config(
    channel: Channel,
    retry: &RetryPolicy,
    send_timeout: Duration,
    nats_timeout: Duration,
    max_ack_pending: usize,
) -> pull::Config {
    let handling = send_timeout + nats_timeout * 3;
    let floor = handling * 2 + Duration::from_secs(1);
    let backoff = retry.backoff.iter().take(retry.max_attempts as usize).map(|d| (*d).max(floor)).collect();
    pull::Config {
        durable_name: Some(channel.to_string()),
        description: Some(format!("{channel} worker")),
        filter_subject: intent_subject(channel),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        max_deliver: retry.max_attempts as i64,
        backoff,
        max_ack_pending: max_ack_pending as i64,
        ..Default::default()
    }
}

fn dlq_mover_config() -> pull::Config {
    pull::Config {
        durable_name: Some(DLQ_MOVER_CONSUMER.into()),
        description: Some("moves max-delivered intents into HERALD_DLQ".into()),
        filter_subject: format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{INTENTS_STREAM}.>"),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Messages of one channel that may wait for a delayed retry at once, beyond those being
/// handled. A message `Nak`ed with a delay still counts against the consumer's
/// `max_ack_pending`, so with a small limit a few hundred notifications to one failing receiver
/// would stop the whole channel; in-flight work is bounded by the worker, not by this.
pub const MAX_WAITING_RETRIES: usize = 10_000;

/// The consumer of `channel` as `config` wants it. The worker keeps at most
/// `webhook_concurrency` messages in flight and as many in its pull buffer.
pub fn channel_consumer(channel: Channel, config: &Config) -> pull::Config {
    channel_consumer_config(
        channel,
        &config.retry,
        config.webhook_timeout,
        config.nats_timeout,
        config.webhook_concurrency * 2 + MAX_WAITING_RETRIES,
    )
}

/// Every stream Herald ensures, in creation order.
pub fn stream_configs(config: &Config) -> Vec<stream::Config> {
    let r = config.stream_replicas;
    vec![
        intents_stream_config(config.duplicate_window, r),
        status_stream_config(r),
        dlq_stream_config(r),
        advisories_stream_config(r),
    ]
}

/// The topology as JetStream API JSON documents (`nats stream add --config <file>`,
/// `nats consumer add <stream> --config <file>`), for operators who provision by hand or
/// review what Herald will create. `herald topology` writes them into `nats/jetstream/`.
pub fn definitions(config: &Config) -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<(String, serde_json::Value)> = stream_configs(config)
        .into_iter()
        .map(|s| {
            (format!("stream.{}.json", s.name), serde_json::to_value(&s).expect("stream configs serialize"))
        })
        .collect();
    for &channel in &config.channels {
        let c = channel_consumer(channel, config);
        out.push((
            format!("consumer.{INTENTS_STREAM}.{channel}.json"),
            serde_json::to_value(&c).expect("consumer configs serialize"),
        ));
    }
    out.push((
        format!("consumer.{ADVISORIES_STREAM}.{DLQ_MOVER_CONSUMER}.json"),
        serde_json::to_value(dlq_mover_config()).expect("consumer configs serialize"),
    ));
    out
}

/// Handles on the ensured topology.
#[derive(Clone)]
pub struct Topology {
    pub js: jetstream::Context,
    pub intents: stream::Stream,
    pub advisories: stream::Stream,
    pub notifications: Notifications,
}

impl Topology {
    /// The durable consumer of `channel`, created or updated to match `config`.
    pub async fn channel_consumer(
        &self,
        channel: Channel,
        config: &Config,
    ) -> Result<PullConsumer, jetstream::stream::ConsumerError> {
        self.intents.create_consumer(channel_consumer(channel, config)).await
    }

    /// The durable consumer of max-delivery advisories.
    pub async fn dlq_mover_consumer(&self) -> Result<PullConsumer, jetstream::stream::ConsumerError> {
        self.advisories.create_consumer(dlq_mover_config()).await
    }
}

/// Creates or updates every stream and bucket.
pub async fn ensure(js: &jetstream::Context, config: &Config) -> anyhow::Result<Topology> {
    use anyhow::Context as _;
    for stream in stream_configs(config) {
        let name = stream.name.clone();
        js.create_or_update_stream(stream).await.with_context(|| format!("ensuring stream {name}"))?;
    }
    let kv = js
        .create_or_update_key_value(notifications_bucket_config(config.stream_replicas))
        .await
        .context("ensuring bucket herald_notifications")?;
    Ok(Topology {
        js: js.clone(),
        intents: js.get_stream(INTENTS_STREAM).await?,
        advisories: js.get_stream(ADVISORIES_STREAM).await?,
        notifications: Notifications::new(js.clone(), kv),
    })
}

/// Connects to the configured NATS servers and builds the JetStream context every service uses.
///
/// The client connects in the background and reconnects forever (at most 2 s apart), so a
/// service started before its nats-server, or one whose server restarts, recovers by itself.
/// Every JetStream call is bounded by `HERALD_NATS_TIMEOUT`.
pub async fn connect(
    config: &Config,
    name: &str,
) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    use anyhow::Context as _;
    if config.nats_urls.is_empty() {
        anyhow::bail!("HERALD_NATS_URL is not set");
    }
    let addrs = config
        .nats_urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>().with_context(|| format!("bad NATS URL {u:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(config.nats_timeout))
        .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(20) as u64))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(addrs)
        .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.nats_timeout)
        .max_ack_inflight(20_000)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok((client, js))
}

/// [`ensure`], retried until NATS answers (a service may start before its server).
pub async fn ensure_with_retry(js: &jetstream::Context, config: &Config) -> anyhow::Result<Topology> {
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure(js, config).await {
            Ok(t) => return Ok(t),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "JetStream topology not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
