//! Everything the console reads from NATS, as plain async functions over a [`Source`]. The
//! background task ([`crate::worker`]) calls them and sends the results to the screen; tests call
//! them directly to fill an [`crate::App`] from a real nats-server.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{
    connection::State,
    jetstream::{
        self,
        consumer::{DeliverPolicy, pull},
    },
};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use herald_shared::{
    Channel, Config, StatusEvent,
    dlq::{DeadLetters, Detail, Filter, MAX_PAGE, Page},
    ledger::{Entry, Ledger},
    topology::{self, INTENTS_STREAM, STATUS_STREAM, Topology},
};

/// How far back the status history reaches when the console starts, and how much of it the
/// overview's sparklines show.
pub const HISTORY: Duration = Duration::from_secs(5 * 60);

/// The console's handles on NATS.
#[derive(Clone)]
pub struct Source {
    /// Kept for the connection state and the server's version, which only the client knows.
    pub client: async_nats::Client,
    /// Stream and consumer information.
    pub js: jetstream::Context,
    /// The dead-letter core: the console is one of its three surfaces.
    pub dlq: DeadLetters,
    /// For the lookup screen (`Ledger::find`).
    pub ledger: Ledger,
    /// Which channels have workers (and so consumers worth showing).
    pub channels: Vec<Channel>,
}

impl Source {
    /// Connects and ensures the topology, giving up after `timeout` so the caller can say
    /// "still connecting" and try again.
    pub async fn connect(config: &Config, timeout: Duration) -> anyhow::Result<Source> {
        let (client, js) = topology::connect(config, "herald-console").await?;
        Source::on(client, js, config, timeout).await
    }

    /// A source over an existing client (the background task keeps one client across retries).
    pub async fn on(
        client: async_nats::Client,
        js: jetstream::Context,
        config: &Config,
        timeout: Duration,
    ) -> anyhow::Result<Source> {
        let topology: Topology = tokio::time::timeout(timeout, topology::ensure(&js, config))
            .await
            .context("NATS did not answer in time")??;
        Ok(Source {
            dlq: DeadLetters::new(&topology),
            ledger: topology.ledger.clone(),
            client,
            js,
            channels: config.channels.clone(),
        })
    }
}

/// One channel's consumer, as the overview shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    pub channel: Channel,
    /// Messages stored for the channel and not yet handed to a worker.
    pub pending: u64,
    /// Handed out and not yet acknowledged: being sent, or waiting for a delayed retry.
    pub in_flight: usize,
    /// Messages handed out more than once: retries and redeliveries after a worker died.
    pub redelivered: usize,
    /// How long the oldest message not yet handed out has waited; `None` when nothing waits.
    pub lag: Option<Duration>,
}

/// One stream's size against its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStats {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    /// The stream's `max_bytes`; `None` when unlimited.
    pub max_bytes: Option<u64>,
}

/// What the overview screen shows, read in one go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    /// `connected`, `disconnected` or `connecting`: from the client, so it is right even when
    /// every request below failed.
    pub connection: String,
    pub server_version: Option<String>,
    /// `None` for a channel whose consumer could not be read (not created yet, or NATS down).
    pub channels: Vec<(Channel, Option<ChannelStats>)>,
    pub streams: Vec<StreamStats>,
    /// The first request that failed, if any did: the screen says the numbers may be stale.
    pub error: Option<String>,
}

/// The state of the client's connection, in words.
pub fn connection_state(client: &async_nats::Client) -> String {
    match client.connection_state() {
        State::Connected => "connected",
        State::Disconnected => "disconnected",
        State::Pending => "connecting",
    }
    .to_owned()
}

/// Consumers, streams and the connection, as of now.
pub async fn load_overview(source: &Source) -> Overview {
    let mut overview = Overview {
        connection: connection_state(&source.client),
        server_version: Some(source.client.server_info().version).filter(|v| !v.is_empty()),
        ..Overview::default()
    };
    if source.client.connection_state() != State::Connected {
        // Every request would wait out its timeout; say so at once instead.
        overview.error = Some(format!("NATS is {}", overview.connection));
        return overview;
    }
    let note = |e: String, overview: &mut Overview| {
        overview.error.get_or_insert(e);
    };
    let intents = match source.js.get_stream(INTENTS_STREAM).await {
        Ok(s) => Some(s),
        Err(e) => {
            note(format!("{INTENTS_STREAM}: {e}"), &mut overview);
            None
        }
    };
    for &channel in &source.channels {
        let stats = match &intents {
            Some(intents) => match channel_stats(intents, channel).await {
                Ok(s) => Some(s),
                Err(e) => {
                    note(format!("consumer {channel}: {e}"), &mut overview);
                    None
                }
            },
            None => None,
        };
        overview.channels.push((channel, stats));
    }
    for name in topology::storage_streams() {
        match stream_stats(&source.js, &name).await {
            Ok(s) => overview.streams.push(s),
            Err(e) => note(format!("{name}: {e}"), &mut overview),
        }
    }
    overview
}

/// A channel's consumers summed over its priority lanes; the lag is the longest any lane's
/// oldest waiting message has waited.
async fn channel_stats(
    intents: &jetstream::stream::Stream,
    channel: Channel,
) -> anyhow::Result<ChannelStats> {
    let mut stats = ChannelStats { channel, pending: 0, in_flight: 0, redelivered: 0, lag: None };
    for lane in topology::Lane::ALL {
        let info = match intents.consumer_info(&topology::lane_consumer(channel, lane)).await {
            Ok(info) => info,
            // A lane's consumer is made when its worker first starts.
            Err(_) if lane != topology::Lane::Bulk => continue,
            Err(e) => return Err(e.into()),
        };
        stats.pending += info.num_pending;
        stats.in_flight += info.num_ack_pending;
        stats.redelivered += info.num_redelivered;
        if info.num_pending > 0 {
            // The next message the consumer will hand out is the oldest one waiting.
            let next = intents
                .direct_get_next_for_subject(
                    topology::lane_subject(channel, lane),
                    Some(info.delivered.stream_sequence + 1),
                )
                .await?;
            let stored = DateTime::from_timestamp(next.time.unix_timestamp(), 0).unwrap_or_default();
            let lag = (Utc::now() - stored).to_std().unwrap_or_default();
            stats.lag = stats.lag.max(Some(lag));
        }
    }
    Ok(stats)
}

async fn stream_stats(js: &jetstream::Context, name: &str) -> anyhow::Result<StreamStats> {
    let info = js.get_stream(name).await?.get_info().await?;
    Ok(StreamStats {
        name: name.to_owned(),
        messages: info.state.messages,
        bytes: info.state.bytes,
        max_bytes: u64::try_from(info.config.max_bytes).ok().filter(|&b| b > 0),
    })
}

/// One page of dead letters matching `filter`, oldest first.
pub async fn load_letters(source: &Source, filter: &Filter) -> anyhow::Result<Page> {
    Ok(source.dlq.list(filter, 0, MAX_PAGE).await?)
}

/// One dead letter in full; `None` once it has left the queue.
pub async fn load_detail(source: &Source, sequence: u64) -> anyhow::Result<Option<Detail>> {
    Ok(source.dlq.detail(sequence).await?)
}

/// Every channel's ledger entry of notification `id`, whatever its tenant.
pub async fn lookup(source: &Source, id: &str) -> anyhow::Result<Vec<(Channel, Entry)>> {
    Ok(source.ledger.find(id.trim()).await?)
}

/// Where a status feed begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// This long ago: the history the sparklines need.
    Since(Duration),
    /// Just after this HERALD_STATUS sequence: resuming a feed that failed, counting nothing twice.
    After(u64),
}

/// One status event off the feed.
#[derive(Debug, Clone)]
pub struct Seen {
    pub event: StatusEvent,
    /// Its HERALD_STATUS sequence, to resume after it.
    pub sequence: u64,
    /// Events stored after it: zero once the feed has caught up with the stream.
    pub pending: u64,
}

/// An ordered consumer over the status events from `start`: the history first, then live
/// events as they are published, from one source so nothing is counted twice.
pub async fn status_feed(
    source: &Source,
    start: Start,
) -> anyhow::Result<impl futures::Stream<Item = anyhow::Result<Seen>> + use<>> {
    let deliver_policy = match start {
        Start::Since(since) => {
            let from = Utc::now() - chrono::Duration::from_std(since).unwrap_or_default();
            let start_time = time::OffsetDateTime::from_unix_timestamp(from.timestamp())
                .context("a start time out of range")?;
            DeliverPolicy::ByStartTime { start_time }
        }
        Start::After(sequence) => DeliverPolicy::ByStartSequence { start_sequence: sequence + 1 },
    };
    let stream = source.js.get_stream(STATUS_STREAM).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "herald.status.>".into(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let messages = consumer.messages().await?;
    Ok(messages.filter_map(|m| async move {
        let m = match m {
            Ok(m) => m,
            Err(e) => return Some(Err(anyhow::anyhow!("status events: {e}"))),
        };
        let (sequence, pending) = m.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
        // Someone else's payload on a status subject is skipped rather than shown wrong.
        serde_json::from_slice::<StatusEvent>(&m.payload)
            .ok()
            .map(|event| Ok(Seen { event, sequence, pending }))
    }))
}

/// Every status event of the last `since`, read until the feed has caught up: what the
/// console shows before live events, and what tests fill an [`crate::App`] with.
pub async fn load_history(source: &Source, since: Duration) -> anyhow::Result<Vec<StatusEvent>> {
    let info = source.js.get_stream(STATUS_STREAM).await?.get_info().await?;
    let mut events = Vec::new();
    if info.state.messages == 0 {
        return Ok(events);
    }
    let feed = status_feed(source, Start::Since(since)).await?;
    futures::pin_mut!(feed);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), feed.next()).await {
            Ok(Some(Ok(seen))) => {
                events.push(seen.event);
                if seen.pending == 0 {
                    break;
                }
            }
            Ok(Some(Err(e))) => return Err(e),
            // Nothing in the window, or the feed ended: what was read is the history.
            Ok(None) | Err(_) => break,
        }
    }
    Ok(events)
}
