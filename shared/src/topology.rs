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

use crate::{config::Config, intent::Channel, ledger::Ledger, state::Outcome, users::Users};

pub const INTENTS_STREAM: &str = "HERALD_INTENTS";
pub const STATUS_STREAM: &str = "HERALD_STATUS";
pub const DLQ_STREAM: &str = "HERALD_DLQ";
pub const ADVISORIES_STREAM: &str = "HERALD_ADVISORIES";
/// Who replayed or discarded which dead letter, and when.
pub const AUDIT_STREAM: &str = "HERALD_AUDIT";
/// Per-recipient counts (`throttle`): a counter per (tenant, user, category, channel, window).
pub const THROTTLE_STREAM: &str = "HERALD_THROTTLE";
pub const NOTIFICATIONS_BUCKET: &str = "herald_notifications";
/// In-app inbox items, one subject per (tenant, user): `herald.inbox.<tenant token>.<user>`.
pub const INBOX_STREAM: &str = "HERALD_INBOX";
/// Read and archived marks of inbox items: `<tenant token>.<user>.<item>.<read|archived>`.
pub const INBOX_STATE_BUCKET: &str = "herald_inbox_state";
/// Each user's notifications, one entry per accepted notification, for the history endpoint:
/// `herald.history.<tenant token>.<user>`.
pub const HISTORY_STREAM: &str = "HERALD_HISTORY";
/// The most history entries kept per user (the oldest go first).
pub const HISTORY_PER_USER: i64 = 10_000;
/// Users, their devices and preferences: `<tenant token>.<user id>` -> user (see `users`).
pub const USERS_BUCKET: &str = "herald_users";
/// Revisions kept per user: the latest is what counts; one more lets an operator see what the
/// last write replaced.
pub const USERS_HISTORY: i64 = 2;
/// Templates: `<tenant token>.<code>.<locale>`, history = versions.
pub const TEMPLATES_BUCKET: &str = "herald_templates";
/// Idempotency keys: `<tenant token>.<hash of the key>` -> the notification it made, each kept
/// for the idempotency horizon by a per-key TTL (see `idempotency`).
pub const IDEMPOTENCY_BUCKET: &str = "herald_idempotency";
/// The longest idempotency horizon: shorter than the ledger keeps entries, so a key's
/// notification can always be looked up while the key is remembered.
pub const MAX_IDEMPOTENCY_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);
/// The durable consumer on HERALD_ADVISORIES that moves max-delivered intents to the DLQ.
pub const DLQ_MOVER_CONSUMER: &str = "dlq_mover";
/// A scratch stream the benchmark publishes to for the raw JetStream rate; deleted after.
pub const BENCH_STREAM: &str = "HERALD_BENCH";
pub const BENCH_SUBJECT: &str = "herald.bench";

/// How long HERALD_INTENTS keeps a message (a pending schedule included).
pub const INTENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The furthest `send_at` accepted: a day short of [`INTENTS_MAX_AGE`], so a schedule always
/// fires before the stream would drop it.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(6 * 24 * 3600);
/// How long the ledger keeps an entry: longer than HERALD_INTENTS keeps the intent, so any
/// message still stored, replayed or redelivered finds its notification's outcome.
pub const LEDGER_MAX_AGE: Duration = Duration::from_secs(8 * 24 * 3600);
/// How long status events are kept: a log to follow, not a record to keep.
pub const STATUS_MAX_AGE: Duration = Duration::from_secs(3 * 24 * 3600);
/// How long advisories are kept: as long as the intents they point to, so a max-deliveries
/// advisory outlives any outage of the mover that could still park its intent.
pub const ADVISORIES_MAX_AGE: Duration = INTENTS_MAX_AGE;
/// At most this many advisories per kind and consumer: a flood of terminations cannot push out
/// a max-deliveries advisory, and stays bounded.
pub const ADVISORIES_PER_SUBJECT: i64 = 100_000;
/// The DLQ's duplicate window: a worker and the mover parking the same message do so within
/// seconds of each other (the ledger keeps them apart beyond that); a long window would cost
/// the server memory per dead letter.
pub const DLQ_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The status stream's duplicate window, for a retried event publish.
pub const STATUS_DUPLICATE_WINDOW: Duration = Duration::from_secs(10);
/// How long operators' actions are kept (unless the stream's share fills first).
pub const AUDIT_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// The share of `HERALD_MAX_STORAGE`, in percent, each stream and the bucket may use. The
/// ledger must hold a finished entry (about 520 bytes with its provider calls) for every intent
/// HERALD_INTENTS can hold waiting (a small one is about 660 bytes), or a backlog that fills
/// the intents stream would leave workers unable to record what they deliver: 33 × 520 / 660
/// ≈ 26 < 29. An idempotency key (about 300 bytes) is kept a day where a ledger entry is kept
/// eight, so 29 × 300 / 520 / 8 ≈ 2.1 < 3 keeps the keys from filling before the ledger.
pub const STORAGE_SHARES: [(&str, u64); 13] = [
    (INTENTS_STREAM, 33),
    (NOTIFICATIONS_BUCKET, 29),
    (IDEMPOTENCY_BUCKET, 3),
    (USERS_BUCKET, 2),
    (TEMPLATES_BUCKET, 2),
    (DLQ_STREAM, 7),
    (STATUS_STREAM, 6),
    (ADVISORIES_STREAM, 5),
    (AUDIT_STREAM, 2),
    (THROTTLE_STREAM, 1),
    (INBOX_STREAM, 6),
    (INBOX_STATE_BUCKET, 1),
    (HISTORY_STREAM, 3),
];

/// The JetStream stream behind every stream and bucket Herald stores data in (a bucket's is
/// `KV_<bucket>`), in the order of [`STORAGE_SHARES`]: what an operator watches fill up.
pub fn storage_streams() -> Vec<String> {
    STORAGE_SHARES
        .iter()
        .map(|(name, _)| if name.starts_with("HERALD_") { (*name).to_owned() } else { format!("KV_{name}") })
        .collect()
}

/// The bytes `name` may use out of `max_storage`.
pub fn storage_share(name: &str, max_storage: u64) -> i64 {
    let percent = STORAGE_SHARES.iter().find(|(n, _)| *n == name).map_or(0, |(_, p)| *p);
    (max_storage / 100 * percent) as i64
}

/// `herald.intent.<channel>`: where intents are published (the bulk lane).
pub fn intent_subject(channel: Channel) -> String {
    format!("herald.intent.{channel}")
}

/// A priority lane. Each channel's intents travel on one subject per lane, each with its own
/// durable consumer and its own worker slots, so a `critical` one-time password never waits
/// behind a bulk backlog of the same channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// `low` and `normal`: `herald.intent.<channel>`, consumer `<channel>`.
    Bulk,
    /// `high`: `herald.intent.<channel>.high`, consumer `<channel>_high`.
    High,
    /// `critical`: `herald.intent.<channel>.critical`, consumer `<channel>_critical`.
    Critical,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Critical, Lane::High, Lane::Bulk];

    /// The lane a priority travels in.
    pub fn of(priority: crate::intent::Priority) -> Lane {
        use crate::intent::Priority;
        match priority {
            Priority::Low | Priority::Normal => Lane::Bulk,
            Priority::High => Lane::High,
            Priority::Critical => Lane::Critical,
        }
    }

    /// `high` or `critical`; none for the bulk lane.
    pub fn suffix(self) -> Option<&'static str> {
        match self {
            Lane::Bulk => None,
            Lane::High => Some("high"),
            Lane::Critical => Some("critical"),
        }
    }
}

/// The subject of `channel`'s `lane`.
pub fn lane_subject(channel: Channel, lane: Lane) -> String {
    match lane.suffix() {
        None => intent_subject(channel),
        Some(suffix) => format!("herald.intent.{channel}.{suffix}"),
    }
}

/// The durable consumer of `channel`'s `lane`.
pub fn lane_consumer(channel: Channel, lane: Lane) -> String {
    match lane.suffix() {
        None => channel.to_string(),
        Some(suffix) => format!("{channel}_{suffix}"),
    }
}

/// The channel and lane a consumer of HERALD_INTENTS serves, if it is a worker's.
pub fn parse_lane_consumer(name: &str) -> Option<(Channel, Lane)> {
    Lane::ALL.into_iter().find_map(|lane| {
        let channel = match lane.suffix() {
            None => name,
            Some(suffix) => name.strip_suffix(suffix)?.strip_suffix('_')?,
        };
        channel.parse().ok().filter(|c| lane_consumer(*c, lane) == name).map(|c| (c, lane))
    })
}

/// Where `intent` is published: its channel's subject in its priority's lane.
pub fn subject_of(intent: &crate::Intent) -> String {
    lane_subject(intent.channel(), Lane::of(intent.priority))
}

/// `herald.schedule.<channel>.<id>`: the schedule that fires an intent at `send_at`.
pub fn schedule_subject(channel: Channel, id: &str) -> String {
    format!("herald.schedule.{channel}.{id}")
}

/// Makes a publish a message schedule that fires `intent` on its subject ([`subject_of`]) at
/// `at`, and answers the subject to publish it on. Schedules have whole seconds: the copy fires
/// at `at` rounded down (rounded up when that has passed already) and carries the exact instant
/// in `Herald-Due`, so the worker waits out what is left ([`due_in`]) and a 3 s retry waits
/// 3 s, not up to 4.
pub fn schedule(
    headers: &mut async_nats::HeaderMap,
    intent: &crate::Intent,
    at: chrono::DateTime<chrono::Utc>,
) -> String {
    use async_nats::header::{NATS_SCHEDULE, NATS_SCHEDULE_TARGET};
    let down = at - chrono::Duration::nanoseconds(i64::from(at.timestamp_subsec_nanos()));
    let fire =
        if down > chrono::Utc::now() || down == at { down } else { down + chrono::Duration::seconds(1) };
    headers.insert(
        NATS_SCHEDULE,
        format!("@at {}", fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).as_str(),
    );
    headers.insert(NATS_SCHEDULE_TARGET, subject_of(intent).as_str());
    headers.insert(
        crate::intent::headers::DUE,
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true).as_str(),
    );
    schedule_subject(intent.channel(), &intent.id)
}

/// How long a fired scheduled copy still has to wait (its `Herald-Due` is ahead of `now`),
/// or `None` when it is due or carries no instant.
pub fn due_in(
    headers: Option<&async_nats::HeaderMap>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let due = headers?.get(crate::intent::headers::DUE)?.as_str();
    let due = chrono::DateTime::parse_from_rfc3339(due).ok()?.with_timezone(&chrono::Utc);
    (due - now).to_std().ok().filter(|left| !left.is_zero())
}

/// `herald.status.<channel>.<outcome>`.
pub fn status_subject(channel: Channel, outcome: Outcome) -> String {
    format!("herald.status.{channel}.{outcome}")
}

/// `herald.dlq.<channel>`.
pub fn dlq_subject(channel: Channel) -> String {
    format!("herald.dlq.{channel}")
}

/// `herald.audit.dlq.<action>`: an operator's replay or discard.
pub fn audit_subject(action: &str) -> String {
    format!("herald.audit.dlq.{action}")
}

/// The advisory subjects HERALD_ADVISORIES keeps (nobody else listens, and the server drops
/// advisories nobody listens to).
pub fn advisory_subjects() -> Vec<String> {
    // Not MSG_NAKED: one per retry, nobody reads them, and the retries view has status events.
    ["MAX_DELIVERIES", "MSG_TERMINATED"]
        .iter()
        .map(|kind| format!("$JS.EVENT.ADVISORY.CONSUMER.{kind}.{INTENTS_STREAM}.>"))
        .collect()
}

pub fn intents_stream_config(duplicate_window: Duration, replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: INTENTS_STREAM.into(),
        description: Some("notification intents, one message per notification and channel".into()),
        // `herald.intent.<channel>` and `herald.intent.<channel>.<lane>`.
        subjects: vec!["herald.intent.*".into(), "herald.intent.*.*".into(), "herald.schedule.*.*".into()],
        // Limits, not WorkQueue: the ids of acked messages must survive a server restart for
        // the duplicate window to hold (see NATS-NOTES).
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: INTENTS_MAX_AGE,
        max_bytes,
        // nats-server allows message schedules only with discard Old: at the limit the oldest
        // messages make room. Those are normally delivered ones, kept only for deduplication;
        // the gateway stops accepting (503 `storage_full`) before the oldest one still needed
        // would go (see `oldest_still_needed`).
        discard: DiscardPolicy::Old,
        duplicate_window,
        allow_direct: true,
        allow_message_schedules: true,
        ..Default::default()
    }
}

fn status_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: STATUS_STREAM.into(),
        description: Some("one event per settled delivery attempt".into()),
        subjects: vec!["herald.status.>".into()],
        storage: StorageType::File,
        max_age: STATUS_MAX_AGE,
        max_bytes,
        // A log: when full, the oldest events make room.
        discard: DiscardPolicy::Old,
        duplicate_window: STATUS_DUPLICATE_WINDOW,
        ..Default::default()
    }
}

fn dlq_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: DLQ_STREAM.into(),
        description: Some("dead letters: the original intent plus why it was parked".into()),
        subjects: vec!["herald.dlq.>".into()],
        storage: StorageType::File,
        // Kept until an operator replays or discards them. When full, parking fails and the
        // worker keeps the message in HERALD_INTENTS (retrying), so nothing is lost.
        max_bytes,
        discard: DiscardPolicy::New,
        duplicate_window: DLQ_DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

fn advisories_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: ADVISORIES_STREAM.into(),
        description: Some("consumer advisories about HERALD_INTENTS".into()),
        subjects: advisory_subjects(),
        storage: StorageType::File,
        max_age: ADVISORIES_MAX_AGE,
        max_bytes,
        max_messages_per_subject: ADVISORIES_PER_SUBJECT,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

fn audit_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: AUDIT_STREAM.into(),
        description: Some("operators' replays and discards of dead letters".into()),
        subjects: vec!["herald.audit.>".into()],
        storage: StorageType::File,
        max_age: AUDIT_MAX_AGE,
        max_bytes,
        // A log: when full, the oldest entries make room rather than an operator being refused.
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

fn notifications_bucket_config(replicas: usize, max_bytes: i64) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        bucket: NOTIFICATIONS_BUCKET.into(),
        description: "the delivery ledger: (tenant, notification, channel) -> state".into(),
        history: 1,
        max_age: LEDGER_MAX_AGE,
        // Full means ledger writes fail: the gateway answers 503 and workers hold their
        // messages until there is room; nothing is dropped.
        max_bytes,
        storage: StorageType::File,
        ..Default::default()
    }
}

fn idempotency_bucket_config(replicas: usize, max_bytes: i64) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        bucket: IDEMPOTENCY_BUCKET.into(),
        description:
            "idempotency keys: (tenant, key) -> notification id and request hash, kept by per-key TTL".into(),
        history: 1,
        // Per-key TTLs (the horizon) need the stream's message TTLs, which limit markers turn on;
        // a marker left when a key expires is kept a minute.
        limit_markers: Some(Duration::from_secs(60)),
        // Full drops the oldest keys (see `kv_stream_config`): past the share, the horizon is
        // as long as the share holds, never a refusal of new requests until keys expire.
        max_bytes,
        storage: StorageType::File,
        ..Default::default()
    }
}

fn users_bucket_config(replicas: usize, max_bytes: i64) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        bucket: USERS_BUCKET.into(),
        description: "users: (tenant, user id) -> addresses, devices, locale, time zone, preferences".into(),
        history: USERS_HISTORY,
        // Kept until deleted: a user is not a log entry.
        max_age: Duration::ZERO,
        // Full means writes answer 503; reads (and every local copy) go on.
        max_bytes,
        storage: StorageType::File,
        ..Default::default()
    }
}

fn templates_bucket_config(replicas: usize, max_bytes: i64) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        bucket: TEMPLATES_BUCKET.into(),
        description: "templates: (tenant, code, locale) -> parts; history = versions".into(),
        // Every write is a version; JetStream keeps at most 64 per key.
        history: crate::template_store::KEPT_VERSIONS,
        max_bytes,
        storage: StorageType::File,
        ..Default::default()
    }
}

/// The stream nats-server keeps a bucket in, as `nats kv add` would create it (ADR-8): what
/// `definitions` writes for operators who provision by hand.
fn kv_stream_config(bucket: &kv::Config) -> stream::Config {
    let window = Duration::from_secs(120);
    stream::Config {
        name: format!("KV_{}", bucket.bucket),
        description: Some(bucket.description.clone()).filter(|d| !d.is_empty()),
        subjects: vec![format!("$KV.{}.>", bucket.bucket)],
        max_messages_per_subject: bucket.history,
        max_bytes: bucket.max_bytes,
        max_age: bucket.max_age,
        storage: bucket.storage,
        num_replicas: bucket.num_replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        // A bucket refuses writes when full, except the idempotency keys: refusing requests
        // until keys expire (a day) would be worse than forgetting the oldest keys early, so
        // that bucket drops its oldest keys and `/ready` says how long keys are really kept.
        discard: if bucket.bucket == IDEMPOTENCY_BUCKET { DiscardPolicy::Old } else { DiscardPolicy::New },
        duplicate_window: if bucket.max_age > Duration::ZERO { window.min(bucket.max_age) } else { window },
        // Per-key TTLs, as `limit_markers` turns them on.
        allow_message_ttl: bucket.limit_markers.is_some(),
        subject_delete_marker_ttl: bucket.limit_markers,
        ..Default::default()
    }
}

/// Every bucket Herald ensures.
pub fn bucket_configs(config: &Config) -> Vec<kv::Config> {
    let r = config.stream_replicas;
    let share = |name| storage_share(name, config.max_storage);
    vec![
        notifications_bucket_config(r, share(NOTIFICATIONS_BUCKET)),
        users_bucket_config(r, share(USERS_BUCKET)),
        templates_bucket_config(r, share(TEMPLATES_BUCKET)),
        idempotency_bucket_config(r, share(IDEMPOTENCY_BUCKET)),
        inbox_state_bucket_config(config, share(INBOX_STATE_BUCKET)),
    ]
}

fn inbox_state_bucket_config(config: &Config, max_bytes: i64) -> kv::Config {
    kv::Config {
        num_replicas: config.stream_replicas,
        bucket: INBOX_STATE_BUCKET.into(),
        description: "inbox marks: (tenant, user, item, read|archived) -> on/off and when".into(),
        history: 1,
        // A mark outlives no item: kept as long as the longest retention, and a day more.
        max_age: config.inbox_retention.longest() + Duration::from_secs(24 * 3600),
        // Full means marking answers 503; what is marked stays.
        max_bytes,
        storage: StorageType::File,
        ..Default::default()
    }
}

/// HERALD_INBOX: every in-app item, one subject per user. The per-user count and each item's
/// age (its tenant's retention, a per-message TTL) are JetStream limits: nothing sweeps.
fn inbox_stream_config(config: &Config, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: config.stream_replicas,
        name: INBOX_STREAM.into(),
        description: Some("in-app inbox items: one subject per (tenant, user)".into()),
        subjects: vec!["herald.inbox.>".into()],
        storage: StorageType::File,
        max_messages_per_subject: config.inbox_max_items,
        // Each item carries its tenant's retention as `Nats-TTL`.
        allow_message_ttl: true,
        max_bytes,
        // An inbox is a feed: when full, the oldest items make room.
        discard: DiscardPolicy::Old,
        // A redelivered intent stores its item once (`Nats-Msg-Id` = the notification).
        duplicate_window: Duration::from_secs(120),
        // Listings read a user's subject with batch direct gets.
        allow_direct: true,
        ..Default::default()
    }
}

/// HERALD_HISTORY: one entry per accepted notification with a user, on the user's subject, kept
/// as long as the ledger keeps the notification's state.
fn history_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: HISTORY_STREAM.into(),
        description: Some("each user's notifications, for the history endpoint".into()),
        subjects: vec!["herald.history.>".into()],
        storage: StorageType::File,
        max_age: LEDGER_MAX_AGE,
        max_messages_per_subject: HISTORY_PER_USER,
        max_bytes,
        discard: DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        // Listings read a user's subject with batch direct gets.
        allow_direct: true,
        ..Default::default()
    }
}

pub fn bench_stream_config() -> stream::Config {
    stream::Config {
        name: BENCH_STREAM.into(),
        subjects: vec![BENCH_SUBJECT.into()],
        storage: StorageType::File,
        ..intents_stream_config(Duration::from_secs(120), 1, -1)
    }
}

/// The durable pull consumer of one channel.
///
/// Herald retries with `Nak(delay)`, so the consumer has no `backoff` list (nats-server
/// backdates a delayed Nak by the first backoff step and then waits for the step of the next
/// redelivery, which stretched every later retry). The ack wait is the claim's lifetime: a
/// live worker holds its message with progress acks for as long as it needs, so the ack wait
/// only decides how soon a dead worker's message comes back. `max_deliver` leaves room for
/// redeliveries that are not attempts (a busy claim, a shutdown, a scheduled wait); attempts
/// are counted by the ledger. `start` resumes a recreated consumer after the old one's ack floor.
pub fn channel_consumer_config(
    channel: Channel,
    lane: Lane,
    config: &Config,
    start: Option<u64>,
) -> pull::Config {
    pull::Config {
        durable_name: Some(lane_consumer(channel, lane)),
        description: Some(match lane.suffix() {
            None => format!("{channel} worker"),
            Some(suffix) => format!("{channel} worker, {suffix} lane"),
        }),
        filter_subject: lane_subject(channel, lane),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: match start {
            Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            None => DeliverPolicy::All,
        },
        ack_wait: config.claim_ttl(),
        max_deliver: max_deliveries(config.retry.max_attempts),
        max_ack_pending: (config.send_concurrency.for_channel(channel) * 2 + MAX_WAITING_RETRIES) as i64,
        ..Default::default()
    }
}

/// Deliveries of one message the server allows: two per attempt plus five.
pub fn max_deliveries(max_attempts: u32) -> i64 {
    i64::from(max_attempts) * 2 + 5
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

/// Every stream Herald ensures, in creation order.
pub fn stream_configs(config: &Config) -> Vec<stream::Config> {
    let r = config.stream_replicas;
    let share = |name| storage_share(name, config.max_storage);
    vec![
        intents_stream_config(config.duplicate_window, r, share(INTENTS_STREAM)),
        status_stream_config(r, share(STATUS_STREAM)),
        dlq_stream_config(r, share(DLQ_STREAM)),
        advisories_stream_config(r, share(ADVISORIES_STREAM)),
        audit_stream_config(r, share(AUDIT_STREAM)),
        throttle_stream_config(r, share(THROTTLE_STREAM)),
        inbox_stream_config(config, share(INBOX_STREAM)),
        history_stream_config(r, share(HISTORY_STREAM)),
    ]
}

/// HERALD_THROTTLE: JetStream counters (`Nats-Incr`), the last total of each window kept
/// until the longest window has passed.
fn throttle_stream_config(replicas: usize, max_bytes: i64) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: THROTTLE_STREAM.into(),
        description: Some("per-recipient counts: (tenant, user, category, channel, window) -> total".into()),
        subjects: vec![format!("{}.>", crate::throttle::SUBJECT_PREFIX)],
        allow_message_counter: true,
        max_messages_per_subject: 1,
        max_age: crate::throttle::MAX_WINDOW + Duration::from_secs(3600),
        max_bytes,
        // Full drops the oldest windows' totals, which are the ones past or nearly past.
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        ..Default::default()
    }
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
        for lane in Lane::ALL {
            let c = channel_consumer_config(channel, lane, config, None);
            out.push((
                format!("consumer.{INTENTS_STREAM}.{}.json", lane_consumer(channel, lane)),
                serde_json::to_value(&c).expect("consumer configs serialize"),
            ));
        }
    }
    for bucket in bucket_configs(config) {
        let s = kv_stream_config(&bucket);
        out.push((
            format!("stream.{}.json", s.name),
            serde_json::to_value(&s).expect("stream configs serialize"),
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
    /// HERALD_DLQ, read and trimmed by [`crate::dlq`].
    pub dlq: stream::Stream,
    /// The delivery ledger in `herald_notifications`.
    pub ledger: Ledger,
    /// Users in `herald_users`.
    pub users: Users,
    /// Templates in `herald_templates`.
    pub templates: crate::template_store::TemplateStore,
    /// Idempotency keys in `herald_idempotency`.
    pub keys: crate::idempotency::Keys,
    /// In-app inboxes: HERALD_INBOX and `herald_inbox_state`.
    pub inbox: crate::inbox::Inbox,
    /// Each user's notifications (HERALD_HISTORY).
    pub history: crate::history::History,
}

impl Topology {
    /// The durable consumer of `channel`'s `lane`. An existing one is used as it is (only
    /// `herald topology apply` changes it); a missing one is created, starting after
    /// `resume_after` when the worker knows where a deleted one had got to.
    pub async fn channel_consumer(
        &self,
        channel: Channel,
        lane: Lane,
        config: &Config,
        resume_after: Option<u64>,
    ) -> Result<PullConsumer, async_nats::Error> {
        use jetstream::context::ConsumerInfoErrorKind;
        let name = lane_consumer(channel, lane);
        match self.intents.consumer_info(&name).await {
            Ok(info) => {
                let want = channel_consumer_config(channel, lane, config, None);
                let have = &info.config;
                if have.ack_wait != want.ack_wait
                    || have.backoff != want.backoff
                    || have.max_deliver != want.max_deliver
                {
                    tracing::warn!(
                        consumer = %name,
                        "the consumer differs from this process's configuration (ack wait, backoff or max deliver); \
                         using it as it is (`herald topology apply` updates it)"
                    );
                }
                self.intents.get_consumer(&name).await
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                let start = resume_after.map(|floor| floor + 1);
                Ok(self
                    .intents
                    .create_consumer(channel_consumer_config(channel, lane, config, start))
                    .await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The durable consumer of max-delivery advisories.
    pub async fn dlq_mover_consumer(&self) -> Result<PullConsumer, jetstream::stream::ConsumerError> {
        self.advisories.create_consumer(dlq_mover_config()).await
    }
}

/// Why the topology could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// NATS did not answer or refused a request: worth retrying.
    #[error("{0}")]
    Nats(String),
    /// What exists differs from this process's configuration in a way it must not change on
    /// its own (replicas): starting would silently reconfigure every other process.
    #[error("{0}")]
    Mismatch(String),
    /// The server cannot hold this topology (too old, or JetStream off): retrying cannot help.
    #[error("{0}")]
    Unsupported(String),
}

/// Refuses a server Herald cannot run on: one older than
/// [`MIN_SERVER_VERSION`](crate::nats_server::MIN_SERVER_VERSION), or one without JetStream.
/// Says what was found, what is needed and how to get it. A client not connected yet (no
/// server info) passes: the next attempt checks again.
pub fn check_server(info: &async_nats::ServerInfo) -> Result<(), TopologyError> {
    use crate::nats_server::{MIN_SERVER_VERSION, PROVISIONED_VERSION, parse_version};
    if info.version.is_empty() {
        return Ok(());
    }
    let at = format!("{}:{}", info.host, info.port);
    match parse_version(&info.version) {
        Some(found) if found < parse_version(MIN_SERVER_VERSION).expect("a version") => {
            Err(TopologyError::Unsupported(format!(
                "nats-server {} at {at} is too old: Herald needs nats-server {MIN_SERVER_VERSION} or newer \
                 (per-message TTLs, message schedules and counters); upgrade it, point HERALD_NATS_URL at a \
                 newer server, or leave HERALD_NATS_URL unset and `herald up` provisions nats-server \
                 {PROVISIONED_VERSION}",
                info.version
            )))
        }
        _ if !info.jetstream => Err(TopologyError::Unsupported(format!(
            "nats-server {} at {at} runs without JetStream: start it with `-js` (or a `jetstream {{}}` block)",
            info.version
        ))),
        _ => Ok(()),
    }
}

/// Waits (up to the NATS timeout) for the client to be connected, so the server's version is
/// known, then [`check_server`]s it: an old server would otherwise take stream configurations
/// with fields it does not know and silently drop them.
async fn connected_to_a_fit_server(js: &jetstream::Context, config: &Config) -> Result<(), TopologyError> {
    let client = js.client();
    let deadline = tokio::time::Instant::now() + config.nats_timeout;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(TopologyError::Nats("not connected to NATS yet".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check_server(&client.server_info())
}

fn nats(context: &str) -> impl Fn(&dyn std::fmt::Display) -> TopologyError + '_ {
    move |e| TopologyError::Nats(format!("{context}: {e}"))
}

/// Creates what is missing and checks what exists. Existing streams and the bucket are not
/// changed: a process configured differently (say a worker started without
/// `HERALD_STREAM_REPLICAS=3` against a cluster) must not reconfigure what every other process
/// uses. A replica count that differs is refused with [`TopologyError::Mismatch`]; other
/// differences are logged with the advice to run `herald topology apply`, which is the one
/// command that changes existing definitions.
pub async fn ensure(js: &jetstream::Context, config: &Config) -> Result<Topology, TopologyError> {
    connected_to_a_fit_server(js, config).await?;
    for want in stream_configs(config) {
        let name = want.name.clone();
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let have = existing.info().await.map_err(|e| nats(&name)(&e))?.config.clone();
                check_drift(&want, &have)?;
            }
            Err(e) if stream_not_found(&e) => {
                js.create_stream(want).await.map_err(|e| nats(&name)(&e))?;
            }
            Err(e) => return Err(nats(&name)(&e)),
        }
    }
    let mut stores = Vec::new();
    for bucket in bucket_configs(config) {
        stores.push(ensure_bucket(js, bucket).await?);
    }
    handles(js, config, stores).await
}

/// Creates a missing bucket or checks an existing one like a stream.
async fn ensure_bucket(js: &jetstream::Context, bucket: kv::Config) -> Result<kv::Store, TopologyError> {
    let name = bucket.bucket.clone();
    let kv_stream = format!("KV_{name}");
    match js.get_stream(&kv_stream).await {
        Ok(mut existing) => {
            let have = existing.info().await.map_err(|e| nats(&kv_stream)(&e))?.config.clone();
            let want = stream::Config {
                name: kv_stream.clone(),
                num_replicas: bucket.num_replicas,
                max_bytes: bucket.max_bytes,
                max_age: bucket.max_age,
                ..have.clone()
            };
            check_drift(&want, &have)?;
            js.get_key_value(&name).await.map_err(|e| nats(&name)(&e))
        }
        Err(e) if stream_not_found(&e) && bucket.bucket == IDEMPOTENCY_BUCKET => {
            // Made as a stream: `create_key_value` would fix its discard policy at `new`.
            js.create_stream(kv_stream_config(&bucket)).await.map_err(|e| nats(&kv_stream)(&e))?;
            js.get_key_value(&name).await.map_err(|e| nats(&name)(&e))
        }
        Err(e) if stream_not_found(&e) => js.create_key_value(bucket).await.map_err(|e| nats(&name)(&e)),
        Err(e) => Err(nats(&kv_stream)(&e)),
    }
}

/// Creates or updates every stream, the bucket and every consumer to match `config`: what
/// `herald topology apply` runs after a change of replicas, storage or retries. A consumer keeps
/// its position (its deliver policy cannot change).
pub async fn apply(js: &jetstream::Context, config: &Config) -> Result<Topology, TopologyError> {
    connected_to_a_fit_server(js, config).await?;
    for want in stream_configs(config) {
        let name = want.name.clone();
        js.create_or_update_stream(want).await.map_err(|e| nats(&name)(&e))?;
    }
    let mut stores = Vec::new();
    for bucket in bucket_configs(config) {
        let name = bucket.bucket.clone();
        if name == IDEMPOTENCY_BUCKET {
            let stream = kv_stream_config(&bucket);
            js.create_or_update_stream(stream).await.map_err(|e| nats(&name)(&e))?;
            stores.push(js.get_key_value(&name).await.map_err(|e| nats(&name)(&e))?);
            continue;
        }
        stores.push(js.create_or_update_key_value(bucket).await.map_err(|e| nats(&name)(&e))?);
    }
    let topology = handles(js, config, stores).await?;
    for &channel in &config.channels {
        for lane in Lane::ALL {
            let name = lane_consumer(channel, lane);
            let mut want = channel_consumer_config(channel, lane, config, None);
            if let Ok(mut existing) = topology.intents.get_consumer::<pull::Config>(&name).await {
                let info = existing.info().await.map_err(|e| nats(&name)(&e))?;
                want.deliver_policy = info.config.deliver_policy;
            }
            topology.intents.create_consumer(want).await.map_err(|e| nats(&name)(&e))?;
        }
    }
    topology
        .advisories
        .create_consumer(dlq_mover_config())
        .await
        .map_err(|e| nats(DLQ_MOVER_CONSUMER)(&e))?;
    Ok(topology)
}

/// The handles of the ensured topology; `stores` in the order of [`bucket_configs`].
async fn handles(
    js: &jetstream::Context,
    config: &Config,
    stores: Vec<kv::Store>,
) -> Result<Topology, TopologyError> {
    let [kv, users, templates, keys, inbox_state]: [kv::Store; 5] =
        stores.try_into().map_err(|_| TopologyError::Nats("bucket list".into()))?;
    Ok(Topology {
        keys: crate::idempotency::Keys::new(keys, config.idempotency_horizon),
        js: js.clone(),
        intents: js.get_stream(INTENTS_STREAM).await.map_err(|e| nats(INTENTS_STREAM)(&e))?,
        advisories: js.get_stream(ADVISORIES_STREAM).await.map_err(|e| nats(ADVISORIES_STREAM)(&e))?,
        dlq: js.get_stream(DLQ_STREAM).await.map_err(|e| nats(DLQ_STREAM)(&e))?,
        ledger: Ledger::new(js.clone(), kv, config.claim_ttl()),
        users: Users::new(users, config.required_categories.clone()),
        templates: crate::template_store::TemplateStore::new(templates),
        inbox: crate::inbox::Inbox::new(
            js.clone(),
            js.get_stream(INBOX_STREAM).await.map_err(|e| nats(INBOX_STREAM)(&e))?,
            inbox_state,
            config.inbox_retention.clone(),
        ),
        history: crate::history::History::new(js.clone()),
    })
}

/// How full HERALD_INTENTS may get, in percent of its `max_bytes`, before the gateway looks at
/// what the next writes would push out.
pub const INTENTS_HIGH_WATER: u64 = 90;

/// Whether HERALD_INTENTS is so full that accepting more could push out a message still
/// needed. The stream discards its oldest messages when full; those are normally delivered
/// ones, kept only for deduplication. The lowest sequence still needed is the first pending
/// schedule, or the first message a channel consumer with work outstanding has not
/// acknowledged. The stream counts as full once it holds [`INTENTS_HIGH_WATER`]% of its
/// `max_bytes` or more and what lies before that sequence — what may be pushed out freely —
/// is less than the remaining `100 − INTENTS_HIGH_WATER`%. Returns why, when full.
pub async fn intents_full(topology: &Topology) -> Result<Option<String>, async_nats::Error> {
    let mut intents = topology.intents.clone();
    let info = intents.info().await?;
    let (used, max) = (info.state.bytes, info.config.max_bytes);
    if max <= 0 || used * 100 < max as u64 * INTENTS_HIGH_WATER || info.state.messages == 0 {
        return Ok(None);
    }
    let first = info.state.first_sequence;
    let mut needed: Option<(u64, String)> = None;
    let mut note = |sequence: u64, what: String| {
        if needed.as_ref().is_none_or(|(s, _)| sequence < *s) {
            needed = Some((sequence, what));
        }
    };
    for channel in Channel::ALL {
        for lane in Lane::ALL {
            if let Ok(c) = topology.intents.consumer_info(&lane_consumer(channel, lane)).await
                && c.num_pending + c.num_ack_pending as u64 > 0
            {
                note(
                    c.ack_floor.stream_sequence + 1,
                    format!("an intent the {channel} worker has not finished"),
                );
            }
        }
    }
    if let Ok(m) = topology.intents.direct_get_next_for_subject("herald.schedule.>", Some(first)).await {
        note(m.sequence, "a pending schedule".to_owned());
    }
    let Some((sequence, what)) = needed else { return Ok(None) };
    let average = used / info.state.messages;
    let evictable = sequence.saturating_sub(first) * average;
    if evictable * 100 >= max as u64 * (100 - INTENTS_HIGH_WATER) {
        return Ok(None);
    }
    Ok(Some(format!(
        "{INTENTS_STREAM} holds {used} of {max} bytes and only about {evictable} bytes of delivered history \
         lie before {what} (sequence {sequence})"
    )))
}

/// Whether the delivery ledger (`herald_notifications`) is [`INTENTS_HIGH_WATER`]% full or more.
/// It refuses writes when full, and a worker that cannot claim a delivery in it holds the
/// message until it can: past the mark, new notifications are refused instead, so what is
/// accepted can still be delivered. Returns why, when full.
pub async fn ledger_full(topology: &Topology) -> Result<Option<String>, async_nats::Error> {
    let mut stream = topology.js.get_stream(format!("KV_{NOTIFICATIONS_BUCKET}")).await?;
    let info = stream.info().await?;
    let (used, max) = (info.state.bytes, info.config.max_bytes);
    if max <= 0 || used * 100 < max as u64 * INTENTS_HIGH_WATER {
        return Ok(None);
    }
    Ok(Some(format!("the delivery ledger ({NOTIFICATIONS_BUCKET}) holds {used} of {max} bytes")))
}

/// How long idempotency keys are really kept, when `herald_idempotency` is full enough
/// ([`INTENTS_HIGH_WATER`]%) to be dropping its oldest keys before their horizon: the age of
/// its oldest key. `None` while keys live out their horizon.
pub async fn keys_kept(topology: &Topology) -> Result<Option<Duration>, async_nats::Error> {
    let mut stream = topology.js.get_stream(format!("KV_{IDEMPOTENCY_BUCKET}")).await?;
    let info = stream.info().await?.clone();
    let (used, max) = (info.state.bytes, info.config.max_bytes);
    if max <= 0 || used * 100 < max as u64 * INTENTS_HIGH_WATER || info.state.messages == 0 {
        return Ok(None);
    }
    let oldest = stream.direct_get(info.state.first_sequence).await?;
    let age = time::OffsetDateTime::now_utc() - oldest.time;
    Ok(Some(Duration::from_secs(age.whole_seconds().max(0) as u64)))
}

/// Whether a JetStream error says a stream or bucket is full (its `max_bytes`, or the server's
/// storage, is used up). Both a refused publish and a refused KV write say it this way.
pub fn is_storage_full(error: &dyn std::fmt::Display) -> bool {
    let text = error.to_string().to_lowercase();
    ["maximum bytes exceeded", "maximum messages exceeded", "insufficient resources", "resources exceeded"]
        .iter()
        .any(|needle| text.contains(needle))
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Refuses a replica count that differs; warns about other differences.
fn check_drift(want: &stream::Config, have: &stream::Config) -> Result<(), TopologyError> {
    if want.num_replicas != have.num_replicas {
        return Err(TopologyError::Mismatch(format!(
            "stream {} has {} replica(s) but HERALD_STREAM_REPLICAS is {}: refusing to start rather than \
             reconfigure it for every other process; set HERALD_STREAM_REPLICAS={} or change it with \
             `herald topology apply`",
            want.name, have.num_replicas, want.num_replicas, have.num_replicas
        )));
    }
    let differs: Vec<&str> = [
        ("max_bytes", want.max_bytes != have.max_bytes),
        ("max_age", want.max_age != have.max_age),
        (
            "duplicate_window",
            want.duplicate_window != have.duplicate_window && want.duplicate_window != Duration::ZERO,
        ),
        ("discard", want.discard != have.discard),
    ]
    .into_iter()
    .filter_map(|(field, differs)| differs.then_some(field))
    .collect();
    if !differs.is_empty() {
        tracing::warn!(
            stream = %want.name,
            fields = ?differs,
            "the stream differs from this process's configuration; using it as it is (`herald topology apply` updates it)"
        );
    }
    Ok(())
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
    let auth = &config.nats_auth;
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &auth.creds_file {
        options =
            options.credentials_file(path).await.with_context(|| format!("reading {}", path.display()))?;
    }
    if let Some(seed) = &auth.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some((user, password)) = &auth.user {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &auth.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &auth.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options
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
                // A refused login or TLS handshake is retried like any connection, and said loudly.
                async_nats::Event::ServerError(e) => {
                    tracing::error!(error = %e, "the NATS server refused this client")
                }
                async_nats::Event::ClientError(e) => tracing::error!(error = %e, "cannot connect to NATS"),
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

/// [`ensure`], retried until NATS answers (a service may start before its server). A
/// [`TopologyError::Mismatch`] or [`TopologyError::Unsupported`] is returned at once.
pub async fn ensure_with_retry(js: &jetstream::Context, config: &Config) -> Result<Topology, TopologyError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure(js, config).await {
            Ok(t) => return Ok(t),
            Err(e @ (TopologyError::Mismatch(_) | TopologyError::Unsupported(_))) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "JetStream topology not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn fired(at: chrono::DateTime<Utc>) -> (String, String) {
        let mut headers = async_nats::HeaderMap::new();
        let intent = crate::Intent::new(Channel::Webhook, Default::default());
        schedule(&mut headers, &intent, at);
        let get = |name: &str| headers.get(name).unwrap().as_str().to_string();
        (get(async_nats::header::NATS_SCHEDULE.as_ref()), get(crate::intent::headers::DUE))
    }

    #[test]
    fn a_schedule_fires_on_the_second_before_and_carries_the_exact_instant() {
        let at = Utc::now() + chrono::Duration::seconds(5);
        let at = at - chrono::Duration::nanoseconds(i64::from(at.timestamp_subsec_nanos()))
            + chrono::Duration::milliseconds(700);
        let (schedule, due) = fired(at);
        let down = at - chrono::Duration::milliseconds(700);
        assert_eq!(schedule, format!("@at {}", down.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(crate::intent::headers::DUE, due.as_str());
        assert_eq!(due_in(Some(&headers), down), Some(std::time::Duration::from_millis(700)));
        assert_eq!(due_in(Some(&headers), at), None);
        assert_eq!(due_in(None, down), None);
    }

    #[test]
    fn lanes_have_their_own_subjects_and_consumers_and_names_parse_back() {
        use crate::intent::Priority;
        let lanes: Vec<Lane> = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical]
            .into_iter()
            .map(Lane::of)
            .collect();
        assert_eq!(lanes, [Lane::Bulk, Lane::Bulk, Lane::High, Lane::Critical]);
        assert_eq!(lane_subject(Channel::Sms, Lane::Bulk), "herald.intent.sms");
        assert_eq!(lane_subject(Channel::Sms, Lane::Critical), "herald.intent.sms.critical");
        for channel in Channel::ALL {
            for lane in Lane::ALL {
                assert_eq!(parse_lane_consumer(&lane_consumer(channel, lane)), Some((channel, lane)));
            }
        }
        assert_eq!(parse_lane_consumer("dlq_mover"), None);
        assert_eq!(parse_lane_consumer("webhook_urgent"), None);
        assert_eq!(parse_lane_consumer("webhook__high"), None);
    }

    #[test]
    fn a_schedule_whose_second_has_passed_fires_on_the_next() {
        let at = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::milliseconds(300);
        let (schedule, _) = fired(at);
        assert_eq!(schedule, "@at 2020-01-01T00:00:01Z");
    }
}
