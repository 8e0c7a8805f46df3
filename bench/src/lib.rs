//! `herald bench`: the load generator that measures the gateway.
//!
//! DESIGN.md ("Performance") asks for four figures, each reported next to the raw JetStream
//! publish rate measured in the same run (as a ratio), because absolute numbers mean little
//! without knowing what the box and its nats-server can do:
//!
//! 1. how fast the gateway accepts notifications (`POST /v1/notifications` answered 202), with
//!    its latency distribution;
//! 2. how fast they are delivered end to end, to a local webhook sink;
//! 3. how much memory the gateway and worker hold;
//! 4. how long `herald up` takes to become ready.
//!
//! The measured `herald up` runs with the log level and format a user gets: the bench takes
//! `RUST_LOG` and `HERALD_LOG_FORMAT` out of its environment and sets only what running against
//! the private nats-server and reaching the sinks needs (addresses, data directory, secrets,
//! replicas, private webhook addresses allowed, the email or SMS provider's URL).
//!
//! A run goes through these phases, one function each:
//!
//! - [`PrivateStack::start`] (unless a gateway URL is given): a real nats-server (or, with
//!   `--cluster`, a three-node cluster with every stream replicated three times; with
//!   `--sync-always`, fsyncing every write) and a child `herald up` pointed at it, so the
//!   measured process is exactly what users run.
//! - [`Sink::start`]: a local receiver every benchmark notification goes to, so the worker
//!   always has a live, fast receiver and delivery is what is measured: a webhook sink, or
//!   with `--channel email` an SMTP sink ([`Sink::start_smtp`], the private stack's
//!   `HERALD_SMTP_URLS`), or with `--channel sms` an HTTP sink answering like Twilio's
//!   Messages API ([`Sink::start_sms`], its `HERALD_TWILIO_BASE_URL`).
//! - [`raw_publish`]: JetStream publishes with the same payload size and replica count, straight
//!   from this process.
//! - [`accept_phase`]: `connections` HTTP clients, closed loop or paced open loop, for a time
//!   or (`--count`) until a number of notifications is sent; one notification per request, or
//!   (`--batch`) up to 1,000 per `POST /v1/notifications/batch`.
//! - [`await_delivery`]: waits until the sink has seen every accepted notification.
//! - Or, with `--priority-backlog`, instead of the end-to-end figure: a `low` backlog accepted
//!   for the sink's slow path, then [`probe_phase`]: paced `critical` notifications to its fast
//!   path, each timed from its acceptance to its arrival.
//! - [`Memory::of_process`]: the child's peak and current resident set.
//!
//! The benchmark runs on the same machine as what it measures, so its own CPU use counts
//! against the gateway; the raw publish ratio is the honest yardstick for that reason too.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use herald_shared::{
    Channel, Config, Intent, auth,
    intent::{self, Content, Recipient},
    nats_server::{self, CLUSTER_SIZE, Locator, NatsCluster, NatsServer, ServerOptions, SyncPolicy},
    topology::{self, BENCH_STREAM, BENCH_SUBJECT},
};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};

/// How long the private `herald up` may take to answer `GET /ready` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the worker to deliver everything that was accepted.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Publish acks in flight during the raw measurement (also async-nats' default ack window).
const RAW_IN_FLIGHT: usize = 5_000;
/// Timeout of one benchmark HTTP request; a request slower than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Latencies are recorded in microseconds, up to this bound (larger ones saturate).
const MAX_LATENCY_US: u64 = 60_000_000;
/// The subject the benchmark's tokens carry (and so the tenant its notifications belong to).
const BENCH_SUBJECT_CLAIM: &str = "bench";
/// Path on the sink the notifications are delivered to.
const HOOK_PATH: &str = "/hook";

/// What to measure and against what.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL of a running gateway (e.g. http://127.0.0.1:8080). None: start a private stack.
    /// Its webhook worker must reach this machine's 127.0.0.1, where the sink listens.
    pub url: Option<String>,
    /// NATS URL(s), comma separated, for the raw JetStream measurement when `url` is given
    /// (None: skip the raw measurement).
    pub nats_url: Option<String>,
    /// Concurrent HTTP connections.
    pub connections: usize,
    /// Length of the accept phase.
    pub duration: Duration,
    /// Offered requests/s in total (open loop); None = closed loop, as fast as possible.
    pub rate: Option<u64>,
    /// Messages for the raw JetStream publish measurement.
    pub raw_messages: usize,
    /// The herald binary, used to spawn `herald up` for the private stack.
    pub herald_exe: PathBuf,
    /// Private stack only: run `herald gateway` instead of `herald up`, so the gateway has the
    /// machine to itself (no worker delivering at the same time); end to end is not measured.
    pub gateway_only: bool,
    /// Private stack only: how the private nats-server syncs its store to disk.
    pub sync: SyncPolicy,
    /// Private stack only: a local three-node cluster, and `HERALD_STREAM_REPLICAS=3`.
    pub cluster: bool,
    /// Replicas of the raw measurement's stream when `url` is given (Herald's own setting).
    pub replicas: usize,
    /// Send by user and template (rendered by the worker from its local copies) instead of
    /// inline content: the benchmark creates the user and the template first.
    pub by_reference: bool,
    /// The channel delivered on, and so the sink started and the provider pointed at it.
    pub channel: BenchChannel,
    /// Notifications per request, sent to `POST /v1/notifications/batch` (None: one per
    /// `POST /v1/notifications`).
    pub batch: Option<usize>,
    /// Send exactly this many notifications, as fast as the connections allow, instead of for
    /// `duration`.
    pub count: Option<u64>,
    /// The priority-lanes measurement instead: queue this many `low` notifications for a slow
    /// receiver, then time `critical` ones to a fast one.
    pub priority_backlog: Option<u64>,
    /// With `priority_backlog`: how many `critical` notifications are timed...
    pub critical: u64,
    /// ...and how far apart they are sent, so they probe the lanes rather than load them.
    pub critical_every: Duration,
}

/// Path on the sink that answers after [`SLOW_ANSWER`]: the backlog's receiver.
const SLOW_PATH: &str = "/slow";
/// How long the slow receiver takes to answer.
const SLOW_ANSWER: Duration = Duration::from_millis(200);
/// Path on the sink whose arrivals are timed one by one: the critical probes' receiver.
const PROBE_PATH: &str = "/probe";
/// How long after the last critical probe was answered the bench waits for the probes still
/// missing; the backlog is never waited for.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The channels the benchmark can deliver on, each to a sink of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BenchChannel {
    /// Signed POSTs to a local HTTP sink.
    #[default]
    Webhook,
    /// SMTP (plain, `?tls=none`) to a local SMTP sink.
    Email,
    /// Twilio's Messages API, answered by a local HTTP sink.
    Sms,
}

impl BenchChannel {
    pub fn channel(self) -> Channel {
        match self {
            BenchChannel::Webhook => Channel::Webhook,
            BenchChannel::Email => Channel::Email,
            BenchChannel::Sms => Channel::Sms,
        }
    }
}

impl std::str::FromStr for BenchChannel {
    type Err = String;

    fn from_str(s: &str) -> Result<BenchChannel, String> {
        match s {
            "webhook" => Ok(BenchChannel::Webhook),
            "email" => Ok(BenchChannel::Email),
            "sms" => Ok(BenchChannel::Sms),
            other => Err(format!("{other:?}: the benchmark delivers on webhook, email or sms")),
        }
    }
}

impl fmt::Display for BenchChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.channel().as_str())
    }
}

/// Everything one run measured. [`fmt::Display`] prints it for people.
#[derive(Debug)]
pub struct BenchReport {
    /// What was measured: the private stack or a given gateway.
    pub target: Target,
    pub connections: usize,
    pub duration: Duration,
    pub rate: Option<u64>,
    /// Size of one encoded intent, the payload of the raw publishes.
    pub payload_bytes: usize,
    /// The raw JetStream publish rate (None when skipped).
    pub raw: Option<RawPublish>,
    pub accept: AcceptStats,
    /// None with `gateway_only`.
    pub delivery: Option<Delivery>,
    /// Memory of the private `herald up` (None for a given gateway, or if it could not be read).
    pub memory: Option<Memory>,
    /// Requests named a user and a template instead of carrying content.
    pub by_reference: bool,
    pub channel: BenchChannel,
    pub batch: Option<usize>,
    pub count: Option<u64>,
    /// The priority-lanes measurement, when that was run instead of end to end.
    pub priority: Option<PriorityStats>,
}

/// `--priority-backlog`: `critical` notifications timed behind a `low` backlog.
#[derive(Debug)]
pub struct PriorityStats {
    /// `low` notifications queued for the slow receiver.
    pub backlog: u64,
    /// Critical probes sent, and the interval between them.
    pub probes: u64,
    pub every: Duration,
    /// Probes answered 202 (only these can be timed from acceptance).
    pub accepted: u64,
    /// Accepted probes that reached the sink before the bench stopped waiting.
    pub arrived: u64,
    /// From each probe's acceptance (its 202 read by the bench) to its arrival at the sink, in
    /// microseconds: the figure DESIGN.md's 100 ms target is about.
    pub from_acceptance_us: Histogram<u64>,
    /// From each probe's request being sent to its arrival, in microseconds: the acceptance
    /// figure plus the accept path, which a caller waits for too.
    pub from_request_us: Histogram<u64>,
    /// Probes that reached the sink before their 202 reached the bench (recorded as 1 µs, the
    /// histogram's floor, in `from_acceptance_us`): the worker can be quicker than the gateway's last write and answer.
    pub before_acceptance: u64,
    /// Backlog notifications the slow receiver had got when the probes were done.
    pub backlog_delivered: u64,
}

/// The system under test.
#[derive(Debug, Clone)]
pub enum Target {
    /// A `herald up` child started by the benchmark.
    PrivateStack {
        /// From spawning the child to its first 200 on `GET /ready`.
        ready_in: Duration,
        /// The nats-server(s) the benchmark started for it.
        nats: NatsSetup,
    },
    /// A gateway somebody else runs.
    External { url: String },
}

/// The NATS side of a private stack: what its durability is and so what the figures cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsSetup {
    /// 1, or [`CLUSTER_SIZE`] with every stream replicated on each node.
    pub nodes: usize,
    pub sync: SyncPolicy,
}

impl NatsSetup {
    /// Replicas of Herald's streams and of the raw measurement's stream.
    pub fn replicas(&self) -> usize {
        self.nodes
    }
}

impl fmt::Display for NatsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.nodes {
            1 => write!(f, "local nats-server")?,
            n => write!(f, "local {n}-node nats cluster, streams R{n}")?,
        }
        match self.sync {
            SyncPolicy::Periodic => Ok(()),
            SyncPolicy::Always => write!(f, ", sync_interval always"),
        }
    }
}

/// The raw JetStream publish measurement.
#[derive(Debug, Clone)]
pub struct RawPublish {
    pub messages: usize,
    /// Replicas of the stream published to.
    pub replicas: usize,
    /// From the first publish to the last ack.
    pub elapsed: Duration,
}

impl RawPublish {
    pub fn per_second(&self) -> f64 {
        per_second(self.messages as u64, self.elapsed)
    }
}

/// The HTTP accept phase.
#[derive(Debug, Clone)]
pub struct AcceptStats {
    /// Answered 202 with a new notification.
    pub accepted: u64,
    /// Answered 202 as a duplicate (should be 0: every request has a fresh key).
    pub duplicates: u64,
    /// Answered with any other status, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response (connection errors, timeouts).
    pub transport_errors: u64,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
    /// From the start of the phase until the last request finished.
    pub elapsed: Duration,
    /// HTTP requests answered (batches count once).
    pub requests: u64,
    /// Latency of 202 answers in microseconds; in open loop from the scheduled send time.
    pub latency_us: Histogram<u64>,
}

impl AcceptStats {
    pub fn per_second(&self) -> f64 {
        per_second(self.accepted, self.elapsed)
    }

    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }
}

/// End-to-end delivery to the sink.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The notifications that had to arrive (those accepted).
    pub expected: u64,
    /// Distinct notifications the sink received.
    pub delivered: u64,
    /// Every POST the sink received, redeliveries included.
    pub posts: u64,
    /// From the start of the accept phase to the last delivery (None: nothing arrived).
    pub span: Option<Duration>,
    /// False when the timeout hit before everything arrived.
    pub complete: bool,
    /// How long the bench waited after the accept phase (longer for larger runs).
    pub timeout: Duration,
}

impl Delivery {
    /// Accepted notifications per second of the span; only meaningful when complete.
    pub fn per_second(&self) -> Option<f64> {
        match (self.complete, self.span) {
            (false, _) => None,
            (true, Some(span)) => Some(per_second(self.expected, span)),
            (true, None) => Some(0.0),
        }
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Peak resident set (`VmHWM`), in KiB.
    pub peak_kib: u64,
    /// Resident set now (`VmRSS`), in KiB.
    pub current_kib: u64,
}

impl Memory {
    /// Reads `VmHWM` and `VmRSS` of `pid` (Linux only).
    pub fn of_process(pid: u32) -> anyhow::Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory { peak_kib: field("VmHWM")?, current_kib: field("VmRSS")? })
    }
}

/// Runs the benchmark and returns what it measured. Progress goes to stderr.
pub async fn run(options: BenchOptions, config: &Config) -> anyhow::Result<BenchReport> {
    check_options(&options)?;
    let channel = options.channel;
    // Where every notification goes, and what the private stack's provider is pointed at.
    let (sink, address, env) = match channel {
        BenchChannel::Webhook => {
            let sink = Sink::start().await?;
            let hook_url = format!("{}{HOOK_PATH}", sink.url);
            (sink, hook_url, Vec::new())
        }
        BenchChannel::Email => {
            let sink = Sink::start_smtp().await?;
            let env = vec![
                (herald_shared::config::SMTP_URLS, sink.url.clone()),
                (herald_shared::config::EMAIL_FROM, "Herald bench <bench@herald.test>".to_owned()),
            ];
            (sink, "reader@bench.test".to_owned(), env)
        }
        BenchChannel::Sms => {
            let sink = Sink::start_sms().await?;
            let env = vec![
                (herald_shared::config::TWILIO_ACCOUNT_SID, BENCH_TWILIO_SID.to_owned()),
                (herald_shared::config::TWILIO_AUTH_TOKEN, "bench-token".to_owned()),
                (herald_shared::config::TWILIO_FROM, "+15005550006".to_owned()),
                (herald_shared::config::TWILIO_BASE_URL, sink.url.clone()),
            ];
            (sink, "+15005550009".to_owned(), env)
        }
    };
    eprintln!("bench: {channel} sink listening on {}", sink.url);

    let stack = match &options.url {
        Some(_) => None,
        None => {
            let setup =
                NatsSetup { nodes: if options.cluster { CLUSTER_SIZE } else { 1 }, sync: options.sync };
            Some(PrivateStack::start(config, &options.herald_exe, options.gateway_only, setup, &env).await?)
        }
    };
    let (base_url, nats_url, replicas, target) = match (&stack, &options.url) {
        (Some(stack), _) => (
            stack.http_url.clone(),
            Some(stack.nats.urls()),
            stack.setup.replicas(),
            Target::PrivateStack { ready_in: stack.ready_in, nats: stack.setup },
        ),
        (None, Some(url)) => {
            let url = url.trim_end_matches('/').to_owned();
            (url.clone(), options.nats_url.clone(), options.replicas, Target::External { url })
        }
        (None, None) => unreachable!("a private stack is started when no URL is given"),
    };

    let payload_bytes = sample_intent(channel, &address).encode().len();
    let raw = match nats_url {
        Some(nats_url) if options.raw_messages > 0 => {
            Some(raw_publish(&nats_url, replicas, options.raw_messages, payload_bytes).await?)
        }
        _ => {
            eprintln!("bench: raw JetStream publish skipped (no NATS URL or --raw-messages 0)");
            None
        }
    };

    let token = auth::mint(
        &config.jwt_secret,
        BENCH_SUBJECT_CLAIM,
        None,
        &[auth::SCOPE_SEND, auth::SCOPE_READ, auth::SCOPE_USERS_WRITE, auth::SCOPE_TEMPLATES_WRITE],
        Duration::from_secs(3600),
    );
    if options.by_reference {
        create_user_and_template(&base_url, &token, channel, &address).await?;
    }
    let plan = LoadPlan {
        endpoint: format!("{base_url}/v1/notifications"),
        authorization: HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the minted token is not a header value")?,
        address,
        channel,
        by_reference: options.by_reference,
        run_id: intent::new_id(),
        connections: options.connections,
        duration: options.duration,
        rate: options.rate,
        batch: options.batch,
        left: options.count.map(|n| Arc::new(AtomicU64::new(n))),
        priority: None,
    };
    if let Some(backlog) = options.priority_backlog {
        let queue = LoadPlan {
            endpoint: plan.endpoint.clone(),
            authorization: plan.authorization.clone(),
            address: format!("{}{SLOW_PATH}", sink.url),
            channel,
            by_reference: false,
            run_id: plan.run_id.clone(),
            connections: options.connections.min(8),
            duration: options.duration,
            rate: None,
            batch: Some(1000),
            left: Some(Arc::new(AtomicU64::new(backlog))),
            priority: Some("low"),
        };
        let accept = accept_phase(&queue).await?;
        let priority =
            probe_phase(&base_url, &token, &sink, accept.accepted, options.critical, options.critical_every)
                .await?;
        let memory = stack.as_ref().and_then(|stack| stack.memory().ok());
        // The backlog is left undelivered: the stack and its store go.
        drop(stack);
        sink.stop();
        return Ok(BenchReport {
            target,
            connections: queue.connections,
            duration: options.duration,
            rate: None,
            payload_bytes,
            raw,
            accept,
            delivery: None,
            memory,
            by_reference: false,
            channel,
            batch: Some(1000),
            count: Some(backlog),
            priority: Some(priority),
        });
    }
    let started = Instant::now();
    let accept = accept_phase(&plan).await?;
    let delivery = if options.gateway_only {
        None
    } else {
        // A large run takes longer to drain: allow a thousand deliveries a second at least.
        let timeout = DELIVERY_TIMEOUT + Duration::from_secs(accept.accepted / 1000);
        Some(await_delivery(&sink, accept.accepted, started, timeout).await)
    };

    let memory = stack.as_ref().and_then(|stack| match stack.memory() {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("bench: could not read the memory of `herald up`: {e:#}");
            None
        }
    });
    drop(stack);
    sink.stop();

    Ok(BenchReport {
        target,
        connections: options.connections,
        duration: options.duration,
        rate: options.rate,
        payload_bytes,
        raw,
        accept,
        delivery,
        memory,
        by_reference: options.by_reference,
        channel,
        batch: options.batch,
        count: options.count,
        priority: None,
    })
}

/// One critical probe: when its request went out, when its 202 came back, its notification id.
struct Probe {
    id: String,
    sent: Instant,
    accepted: Instant,
}

/// Sends `count` `critical` notifications, one every `every`, to the sink's fast path while the
/// backlog is worked on, then waits (up to [`PROBE_TIMEOUT`]) for those accepted to arrive, and
/// times each from its request and from its acceptance to its arrival. Every instant is read
/// in this process, so all of them are on one clock.
async fn probe_phase(
    base_url: &str,
    token: &str,
    sink: &Sink,
    backlog: u64,
    count: u64,
    every: Duration,
) -> anyhow::Result<PriorityStats> {
    eprintln!("bench: {backlog} low queued; sending {count} critical, one every {} ms", every.as_millis());
    let http = reqwest::Client::builder().no_proxy().timeout(REQUEST_TIMEOUT).build()?;
    let url = format!("{base_url}/v1/notifications");
    let target = format!("{}{PROBE_PATH}", sink.url);
    let mut ticks = tokio::time::interval(every);
    // A probe answered late must not make the next ones bunch up behind it.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sends = Vec::new();
    for n in 0..count {
        ticks.tick().await;
        let (http, url, token) = (http.clone(), url.clone(), token.to_owned());
        let body = probe_body(&target, n);
        sends.push(tokio::spawn(async move {
            let sent = Instant::now();
            let resp = http.post(url).bearer_auth(token).header(CONTENT_TYPE, "application/json");
            let resp = resp.body(body).send().await.ok()?;
            if resp.status() != reqwest::StatusCode::ACCEPTED {
                return None;
            }
            let accepted = Instant::now();
            let answer: serde_json::Value = resp.json().await.ok()?;
            Some(Probe { id: answer["id"].as_str()?.to_owned(), sent, accepted })
        }));
    }
    let mut probes = Vec::new();
    for s in sends {
        probes.extend(s.await?);
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let all_in = |arrivals: &std::collections::HashMap<String, Instant>| {
        probes.iter().all(|p| arrivals.contains_key(&p.id))
    };
    while Instant::now() < deadline && !all_in(&sink.state.probes.lock().expect("never poisoned")) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrivals = sink.state.probes.lock().expect("never poisoned").clone();
    let timed = time_probes(&probes, &arrivals)?;
    let backlog_delivered = sink.delivered().saturating_sub(timed.arrived);
    Ok(PriorityStats {
        backlog,
        probes: count,
        every,
        accepted: probes.len() as u64,
        arrived: timed.arrived,
        from_acceptance_us: timed.from_acceptance_us,
        from_request_us: timed.from_request_us,
        before_acceptance: timed.before_acceptance,
        backlog_delivered,
    })
}

/// The body of critical probe `n`: to `target`, with `n` in its content so a sink's log can
/// tell the probes apart (the sink itself matches them by `Herald-Notification-Id`).
fn probe_body(target: &str, n: u64) -> String {
    serde_json::json!({
        "priority": "critical",
        "recipient": {"webhook_url": target},
        "channels": ["webhook"],
        "content": {"title": "probe", "body": format!("{n:06}")}
    })
    .to_string()
}

/// What [`time_probes`] makes of the probes and their arrivals.
struct ProbeTimes {
    arrived: u64,
    from_acceptance_us: Histogram<u64>,
    from_request_us: Histogram<u64>,
    before_acceptance: u64,
}

/// Matches probes with their arrivals by notification id and records both latencies. One that
/// arrived before its 202 was read counts as no time (1 µs) from acceptance, and is counted
/// apart.
fn time_probes(
    probes: &[Probe],
    arrivals: &std::collections::HashMap<String, Instant>,
) -> anyhow::Result<ProbeTimes> {
    let histogram = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating a histogram");
    let mut times = ProbeTimes {
        arrived: 0,
        from_acceptance_us: histogram()?,
        from_request_us: histogram()?,
        before_acceptance: 0,
    };
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    for probe in probes {
        let Some(&at) = arrivals.get(&probe.id) else { continue };
        times.arrived += 1;
        if at < probe.accepted {
            times.before_acceptance += 1;
        }
        times.from_acceptance_us.saturating_record(micros(at.saturating_duration_since(probe.accepted)));
        times.from_request_us.saturating_record(micros(at.saturating_duration_since(probe.sent)));
    }
    Ok(times)
}

/// The user and template a run by reference names: the user's address on `channel` is the
/// sink's.
async fn create_user_and_template(
    base_url: &str,
    token: &str,
    channel: BenchChannel,
    address: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let field = match channel {
        BenchChannel::Webhook => "webhook_url",
        BenchChannel::Email => "email",
        BenchChannel::Sms => "phone",
    };
    let user = serde_json::json!({"name": "Bench", field: address, "locale": "en", "time_zone": "UTC"});
    let template = serde_json::json!({
        "webhook_title": "bench",
        "webhook_body": "hello {{user.name}} #{{number n}}",
        "email_subject": "bench #{{n}}",
        "email_text": "hello {{user.name}} #{{number n}}",
        "email_html": "<p>hello {{user.name}} #{{number n}}</p>",
        "sms_text": "hello {{user.name}} #{{number n}}",
    });
    for (path, body) in [
        (format!("{base_url}/v1/users/{BENCH_USER}"), user),
        (format!("{base_url}/v1/templates/{BENCH_TEMPLATE}/en"), template),
    ] {
        let resp = http.put(&path).bearer_auth(token).json(&body).send().await?;
        anyhow::ensure!(resp.status().is_success(), "PUT {path}: {} {}", resp.status(), resp.text().await?);
    }
    Ok(())
}

/// The user and template of a run by reference.
const BENCH_USER: &str = "bench";
const BENCH_TEMPLATE: &str = "bench";

/// Refuses options that cannot produce a measurement, before anything is started.
fn check_options(options: &BenchOptions) -> anyhow::Result<()> {
    if options.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if options.duration.is_zero() {
        bail!("--duration must be greater than zero");
    }
    if options.rate == Some(0) {
        bail!("--rate must be at least 1 request/s");
    }
    if options.batch.is_some_and(|b| !(1..=1000).contains(&b)) {
        bail!("--batch takes 1 to 1000 notifications per request");
    }
    if options.count == Some(0) {
        bail!("--count must be at least 1");
    }
    if options.count.is_some() && options.rate.is_some() {
        bail!("--count sends as fast as it can; it does not take --rate");
    }
    if options.url.is_some() && options.channel != BenchChannel::Webhook {
        bail!(
            "--channel {} needs the private stack: its provider is pointed at the benchmark's sink",
            options.channel
        );
    }
    if options.url.is_some() && (options.cluster || options.sync != SyncPolicy::Periodic) {
        bail!("--cluster and --sync-always shape the private nats-server; they do not apply with --url");
    }
    if options.priority_backlog.is_some() {
        // The backlog goes in batches of 1,000 and the probes at their own pace, both as webhooks
        // to the sink's two paths; the load options would be silently ignored.
        let ignored = [
            (options.rate.is_some(), "--rate"),
            (options.count.is_some(), "--count"),
            (options.batch.is_some(), "--batch"),
            (options.by_reference, "--by-reference"),
            (options.gateway_only, "--gateway-only"),
            (options.channel != BenchChannel::Webhook, "--channel other than webhook"),
        ];
        if let Some((_, flag)) = ignored.iter().find(|(set, _)| *set) {
            bail!("--priority-backlog does not take {flag}: it measures webhook delivery of its own load");
        }
        if options.critical == 0 {
            bail!("--critical must be at least 1");
        }
        if options.critical_every.is_zero() {
            bail!("--critical-every must be greater than zero");
        }
    }
    Ok(())
}

/// Requests/s, 0 for an empty interval.
fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() { 0.0 } else { count as f64 / elapsed.as_secs_f64() }
}

// ---------------------------------------------------------------------------------------------
// Private stack

/// A nats-server (or cluster) and a `herald up` child using it, all killed on drop.
///
/// `herald up` with `HERALD_NATS_URL` set starts no nats-server of its own, so the child holds
/// exactly the gateway and the webhook worker, and its memory is theirs.
struct PrivateStack {
    /// Declared first so that it is dropped (killed) before the nats-server it uses.
    child: ChildGuard,
    nats: PrivateNats,
    setup: NatsSetup,
    http_url: String,
    ready_in: Duration,
    /// The child's data directory and log; dropped last.
    _dir: tempfile::TempDir,
}

impl PrivateStack {
    async fn start(
        config: &Config,
        herald_exe: &Path,
        gateway_only: bool,
        setup: NatsSetup,
        env: &[(&'static str, String)],
    ) -> anyhow::Result<PrivateStack> {
        let nats = PrivateNats::start(config, setup).await?;
        eprintln!("bench: {setup} running at {}", nats.urls());

        let dir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        let http_addr = format!("127.0.0.1:{}", nats_server::free_port());
        let log_path = dir.path().join("herald-up.log");
        let log =
            std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let spawned_at = Instant::now();
        let child = Command::new(herald_exe)
            .arg(if gateway_only { "gateway" } else { "up" })
            .env(herald_shared::config::NATS_URL, nats.urls())
            .env(herald_shared::config::STREAM_REPLICAS, setup.replicas().to_string())
            .env(herald_shared::config::HTTP_ADDR, &http_addr)
            .env(herald_shared::config::DATA_DIR, dir.path().join("data"))
            .env(herald_shared::config::JWT_SECRET, &config.jwt_secret)
            .env(herald_shared::config::WEBHOOK_SECRET, &config.webhook_secret)
            // The sink listens on 127.0.0.1.
            .env(herald_shared::config::WEBHOOK_ALLOW_PRIVATE, "true")
            .envs(env.iter().map(|(k, v)| (*k, v)))
            // The log level and format a user gets, whatever the shell running the bench has
            // set: the measured figures include the per-request log line.
            .env_remove("RUST_LOG")
            .env_remove(herald_shared::config::LOG_FORMAT)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {} up", herald_exe.display()))?;
        let mut child = ChildGuard { child, log_path };
        let http_url = format!("http://{http_addr}");
        wait_until_ready(&http_url, &mut child).await?;
        let ready_in = spawned_at.elapsed();
        eprintln!("bench: stack ready in {} ms (herald up at {http_url})", ready_in.as_millis());
        Ok(PrivateStack { child, nats, setup, http_url, ready_in, _dir: dir })
    }

    /// The child's memory now (it holds the gateway and the worker).
    fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of_process(self.child.id())
    }
}

/// The private stack's NATS: one server or a cluster.
enum PrivateNats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl PrivateNats {
    async fn start(config: &Config, setup: NatsSetup) -> anyhow::Result<PrivateNats> {
        let locator = Locator::from_config(config);
        if setup.nodes > 1 {
            let cluster = NatsCluster::start(&locator, setup.sync)
                .await
                .context("starting a nats cluster for the private stack")?;
            return Ok(PrivateNats::Cluster(cluster));
        }
        // Finding (possibly provisioning) and starting the server blocks; keep it off the runtime.
        let server = tokio::task::spawn_blocking(move || {
            NatsServer::start_with_sync(&locator, ServerOptions::default(), setup.sync)
        })
        .await
        .context("the nats-server start task failed")?
        .context("starting nats-server for the private stack")?;
        Ok(PrivateNats::Single(server))
    }

    /// Client URLs, comma separated.
    fn urls(&self) -> String {
        match self {
            PrivateNats::Single(server) => server.url(),
            PrivateNats::Cluster(cluster) => cluster.urls(),
        }
    }
}

/// A child process killed (and reaped) on drop.
struct ChildGuard {
    child: Child,
    log_path: PathBuf,
}

impl ChildGuard {
    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the child's log if it has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("checking on herald up")? {
            bail!("herald up exited with {status}:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the child's log, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /ready` until it answers 200, the child dies, or [`READY_TIMEOUT`] passes.
async fn wait_until_ready(base_url: &str, child: &mut ChildGuard) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the readiness client")?;
    let url = format!("{base_url}/ready");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        child.check_alive()?;
        let last = match client.get(&url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(r) => format!("status {}", r.status()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "herald up was not ready within {}s (last: {last}); its log:\n{}",
                READY_TIMEOUT.as_secs(),
                child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Webhook sink

/// What the sink has seen. Deliveries are de-duplicated by `Herald-Notification-Id`, so a
/// redelivery cannot make the end-to-end figure look complete early.
#[derive(Default)]
struct SinkState {
    posts: AtomicU64,
    distinct: AtomicU64,
    seen: Mutex<HashSet<String>>,
    /// Nanoseconds after `SinkState::epoch` of the last new delivery (0: none yet).
    last_nanos: AtomicU64,
    /// When each notification sent to [`PROBE_PATH`] arrived, by id.
    probes: Mutex<std::collections::HashMap<String, Instant>>,
}

/// A local HTTP server answering 200 to every POST, counting them.
struct Sink {
    url: String,
    epoch: Instant,
    state: Arc<SinkState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Sink {
    async fn start() -> anyhow::Result<Sink> {
        Sink::serve(SinkKind::Webhook).await
    }

    /// Serves a sink of `kind` on an ephemeral port.
    async fn serve(kind: SinkKind) -> anyhow::Result<Sink> {
        let what = match kind {
            SinkKind::Webhook => "webhook",
            SinkKind::Sms => "SMS",
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .with_context(|| format!("binding the {what} sink"))?;
        let addr = listener.local_addr().with_context(|| format!("the {what} sink's address"))?;
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)
            .with_context(|| format!("the {what} sink's acceptor"))?;
        let epoch = Instant::now();
        let state = Arc::new(SinkState::default());
        let endpoint = {
            let state = state.clone();
            poem::endpoint::make(move |req: poem::Request| {
                let state = state.clone();
                async move {
                    match kind {
                        SinkKind::Webhook => {
                            poem::IntoResponse::into_response(receive(&state, epoch, req).await)
                        }
                        SinkKind::Sms => receive_sms(&state, epoch, req).await,
                    }
                }
            })
        };
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let signal = async {
                let _ = stopped.await;
            };
            if let Err(e) = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(endpoint, signal, Some(Duration::from_secs(1)))
                .await
            {
                eprintln!("bench: the {what} sink failed: {e}");
            }
        });
        Ok(Sink { url: format!("http://{addr}"), epoch, state, shutdown: Some(shutdown) })
    }

    /// Distinct notifications received so far.
    fn delivered(&self) -> u64 {
        self.state.distinct.load(Ordering::Acquire)
    }

    /// When the last new notification arrived.
    fn last_delivery(&self) -> Option<Instant> {
        match self.state.last_nanos.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n)),
        }
    }

    fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Handles one request to the sink: reads the body (so the connection can be reused), counts
/// POSTs and answers 200.
async fn receive(state: &SinkState, epoch: Instant, req: poem::Request) -> poem::http::StatusCode {
    if req.method() != poem::http::Method::POST {
        return poem::http::StatusCode::OK;
    }
    let id = req.header(intent::headers::NOTIFICATION_ID).map(str::to_owned);
    let path = req.uri().path().to_owned();
    let _ = req.into_body().into_bytes().await;
    if path == PROBE_PATH
        && let Some(id) = &id
    {
        state.probes.lock().expect("never poisoned").entry(id.clone()).or_insert_with(Instant::now);
    }
    if path == SLOW_PATH {
        tokio::time::sleep(SLOW_ANSWER).await;
    }
    state.record(epoch, id);
    poem::http::StatusCode::OK
}

impl SinkState {
    /// Counts one delivery; `id` (the notification's, when the channel carries it) tells a
    /// redelivery from a new one.
    fn record(&self, epoch: Instant, id: Option<String>) {
        self.posts.fetch_add(1, Ordering::Relaxed);
        let new = match id {
            Some(id) => self.seen.lock().map(|mut seen| seen.insert(id)).unwrap_or(true),
            None => true,
        };
        if new {
            let nanos = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
            self.last_nanos.fetch_max(nanos, Ordering::AcqRel);
            self.distinct.fetch_add(1, Ordering::AcqRel);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP sink

impl Sink {
    /// A minimal SMTP server on 127.0.0.1 (plain text, no AUTH) that takes every message and
    /// counts it by its `Herald-Notification-Id` header. Its `url` is an `HERALD_SMTP_URLS`.
    async fn start_smtp() -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the SMTP sink")?;
        let addr = listener.local_addr().context("the SMTP sink's address")?;
        let epoch = Instant::now();
        let state = Arc::new(SinkState::default());
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let sessions = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let state = sessions.clone();
                            tokio::spawn(async move {
                                let _ = smtp_session(stream, &state, epoch).await;
                            });
                        }
                        Err(e) => {
                            eprintln!("bench: the SMTP sink cannot accept: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                }
            }
        });
        Ok(Sink { url: format!("smtp://{addr}?tls=none"), epoch, state, shutdown: Some(shutdown) })
    }
}

/// One SMTP session: 220, then EHLO/HELO, MAIL, RCPT, RSET and NOOP answered 250, DATA read
/// to the lone dot and answered 250, QUIT 221. Only what a client sending mail needs.
async fn smtp_session(
    stream: tokio::net::TcpStream,
    state: &SinkState,
    epoch: Instant,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    write.write_all(b"220 bench.herald.test ESMTP sink\r\n").await?;
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).map(<[u8]>::to_ascii_uppercase).unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-bench.herald.test\r\n250 8BITMIME\r\n",
            b"HELO" => b"250 bench.herald.test\r\n",
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => b"250 2.0.0 OK\r\n",
            b"QUIT" => {
                write.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            b"DATA" => {
                write.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let id = read_data(&mut read, &mut line).await?;
                state.record(epoch, id);
                b"250 2.0.0 OK: queued\r\n"
            }
            _ => b"502 5.5.2 command not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// Reads a message up to the line holding a lone dot; returns its `Herald-Notification-Id`.
async fn read_data(
    read: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    use tokio::io::AsyncBufReadExt;
    const HEADER: &[u8] = b"herald-notification-id:";
    let mut id = None;
    let mut in_headers = true;
    loop {
        line.clear();
        if read.read_until(b'\n', line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.as_slice() == b".\r\n" || line.as_slice() == b".\n" {
            return Ok(id);
        }
        if in_headers {
            if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
                in_headers = false;
            } else if line.len() > HEADER.len() && line[..HEADER.len()].eq_ignore_ascii_case(HEADER) {
                id = Some(String::from_utf8_lossy(&line[HEADER.len()..]).trim().to_owned());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SMS sink

/// The account SID the private stack is given for SMS.
const BENCH_TWILIO_SID: &str = "ACbench00000000000000000000000000";

impl Sink {
    /// An HTTP server answering `POST /2010-04-01/Accounts/{sid}/Messages.json` as Twilio does
    /// (201, JSON with `sid`, `status: "queued"`, `num_segments`), counting each message (by
    /// its `I-Twilio-Idempotency-Token` when the request carries one). Its `url` is an
    /// `HERALD_TWILIO_BASE_URL`.
    async fn start_sms() -> anyhow::Result<Sink> {
        Sink::serve(SinkKind::Sms).await
    }
}

/// What a benchmark sink stands in for.
#[derive(Debug, Clone, Copy)]
enum SinkKind {
    /// A webhook receiver.
    Webhook,
    /// Twilio's Messages API.
    Sms,
}

/// Answers one request to the SMS sink like Twilio's Messages API.
async fn receive_sms(state: &SinkState, epoch: Instant, req: poem::Request) -> poem::Response {
    let path = req.uri().path().to_owned();
    let account = path
        .strip_prefix("/2010-04-01/Accounts/")
        .and_then(|rest| rest.strip_suffix("/Messages.json"))
        .filter(|sid| !sid.is_empty() && !sid.contains('/'))
        .map(str::to_owned);
    let (Some(account), true) = (account, req.method() == poem::http::Method::POST) else {
        return poem::Response::builder().status(poem::http::StatusCode::NOT_FOUND).body("not found");
    };
    let id = req.header("I-Twilio-Idempotency-Token").map(str::to_owned);
    let _ = req.into_body().into_bytes().await;
    state.record(epoch, id);
    let n = state.posts.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "sid": format!("SM{n:032x}"),
        "account_sid": account,
        "status": "queued",
        "num_segments": "1",
        "error_code": null,
        "error_message": null,
    });
    poem::Response::builder()
        .status(poem::http::StatusCode::CREATED)
        .content_type("application/json")
        .body(body.to_string())
}

// ---------------------------------------------------------------------------------------------
// Raw JetStream publish

/// An intent like the ones the benchmark's HTTP requests produce, to size the raw payload.
fn sample_intent(channel: BenchChannel, address: &str) -> Intent {
    let mut data = serde_json::Map::new();
    data.insert("n".into(), serde_json::Value::from(1_000_000u64));
    let (recipient, content) = match channel {
        BenchChannel::Webhook => (
            Recipient { webhook_url: Some(address.into()), ..Recipient::default() },
            Content { title: Some("bench".into()), body: Some("hello".into()), ..Content::default() },
        ),
        BenchChannel::Email => (
            Recipient { email: Some(address.into()), ..Recipient::default() },
            Content { subject: Some("bench".into()), body: Some("hello".into()), ..Content::default() },
        ),
        BenchChannel::Sms => (
            Recipient { phone: Some(address.into()), ..Recipient::default() },
            Content { body: Some("hello".into()), ..Content::default() },
        ),
    };
    Intent {
        tenant: Some(BENCH_SUBJECT_CLAIM.into()),
        correlation_id: Some(intent::new_id()),
        content,
        data,
        ..Intent::new(channel.channel(), recipient)
    }
}

/// Publishes `messages` messages of `payload_bytes` to a scratch stream with `replicas`
/// replicas, each with its own `Nats-Msg-Id` like the gateway's publishes, keeping
/// [`RAW_IN_FLIGHT`] acks in flight. This is the ceiling the gateway's rates are compared
/// against. `nats_urls` is comma separated. The stream is deleted afterwards.
async fn raw_publish(
    nats_urls: &str,
    replicas: usize,
    messages: usize,
    payload_bytes: usize,
) -> anyhow::Result<RawPublish> {
    let urls: Vec<&str> = nats_urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let client =
        async_nats::connect(urls).await.with_context(|| format!("connecting to NATS at {nats_urls}"))?;
    let js = async_nats::jetstream::new(client);
    // A stream left behind by an interrupted run would carry old messages and ids.
    let _ = js.delete_stream(BENCH_STREAM).await;
    let config =
        async_nats::jetstream::stream::Config { num_replicas: replicas, ..topology::bench_stream_config() };
    js.create_stream(config)
        .await
        .with_context(|| format!("creating the scratch stream {BENCH_STREAM} (R{replicas})"))?;
    let result = publish_all(&js, messages, Bytes::from(vec![b'x'; payload_bytes])).await;
    if let Err(e) = js.delete_stream(BENCH_STREAM).await {
        eprintln!("bench: could not delete the scratch stream {BENCH_STREAM}: {e}");
    }
    let elapsed = result?;
    let raw = RawPublish { messages, replicas, elapsed };
    eprintln!(
        "bench: raw JetStream publish (R{replicas}): {messages} messages of {payload_bytes} B in {:.2} s = {:.0} msg/s",
        elapsed.as_secs_f64(),
        raw.per_second()
    );
    Ok(raw)
}

/// The publishing loop of [`raw_publish`]; returns the time from first publish to last ack.
async fn publish_all(
    js: &async_nats::jetstream::Context,
    messages: usize,
    payload: Bytes,
) -> anyhow::Result<Duration> {
    let run = intent::new_id();
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..messages {
        while in_flight.len() >= RAW_IN_FLIGHT {
            next_ack(&mut in_flight).await?;
        }
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("{run}:{i}"));
        let ack =
            js.send_publish(BENCH_SUBJECT, message).await.context("publishing to the scratch stream")?;
        in_flight.push(ack.into_future());
    }
    while !in_flight.is_empty() {
        next_ack(&mut in_flight).await?;
    }
    Ok(started.elapsed())
}

/// Awaits one publish ack; a duplicate means the ids were not unique and the figure is wrong.
async fn next_ack<F>(in_flight: &mut FuturesUnordered<F>) -> anyhow::Result<()>
where
    F: Future<
        Output = Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
    >,
{
    if let Some(ack) = in_flight.next().await {
        let ack = ack.context("waiting for a publish ack from the scratch stream")?;
        if ack.duplicate {
            bail!("the scratch stream reported a duplicate message id");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP accept phase

/// What every load task needs.
struct LoadPlan {
    /// `{base}/v1/notifications`.
    endpoint: String,
    authorization: HeaderValue,
    /// The recipient's address on `channel` (the sink's).
    address: String,
    channel: BenchChannel,
    by_reference: bool,
    /// Makes this run's idempotency keys unique even against a long-running gateway.
    run_id: String,
    connections: usize,
    duration: Duration,
    rate: Option<u64>,
    /// Notifications per batch request, if batches are sent.
    batch: Option<usize>,
    /// With `--count`: the notifications still to send, shared by the tasks.
    left: Option<Arc<AtomicU64>>,
    /// A `priority` every notification carries (none: the default).
    priority: Option<&'static str>,
}

/// What one load task saw.
struct TaskResult {
    requests: u64,
    accepted: u64,
    duplicates: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    latency_us: Histogram<u64>,
}

impl TaskResult {
    fn new() -> anyhow::Result<TaskResult> {
        Ok(TaskResult {
            requests: 0,
            accepted: 0,
            duplicates: 0,
            statuses: BTreeMap::new(),
            transport_errors: 0,
            first_error: None,
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .context("creating a latency histogram")?,
        })
    }
}

/// Drives `connections` tasks for `duration` and merges what they saw.
async fn accept_phase(plan: &LoadPlan) -> anyhow::Result<AcceptStats> {
    match plan.rate {
        None if plan.left.is_some() => eprintln!(
            "bench: accept phase: {} connections, closed loop, {} notifications",
            plan.connections,
            plan.left.as_ref().map_or(0, |l| l.load(Ordering::Acquire))
        ),
        None => eprintln!(
            "bench: accept phase: {} connections, closed loop, {:.1} s",
            plan.connections,
            plan.duration.as_secs_f64()
        ),
        Some(rate) => eprintln!(
            "bench: accept phase: {} connections, open loop at {rate}/s, {:.1} s",
            plan.connections,
            plan.duration.as_secs_f64()
        ),
    }
    let started = tokio::time::Instant::now();
    // With `--count` the tasks stop when the count is sent, not at a time.
    let deadline = started + if plan.left.is_some() { Duration::from_secs(24 * 3600) } else { plan.duration };
    let mut tasks = Vec::with_capacity(plan.connections);
    let endpoint = url::Url::parse(&plan.endpoint).context("parsing the gateway URL")?;
    let authority = format!(
        "{}:{}",
        endpoint.host_str().context("the gateway URL has no host")?,
        endpoint.port_or_known_default().context("the gateway URL has no port")?
    );
    for task in 0..plan.connections {
        let worker = LoadTask {
            connection: None,
            authority: authority.clone(),
            path: match plan.batch {
                Some(_) => format!("{}/batch", endpoint.path()),
                None => endpoint.path().to_owned(),
            },
            batch: plan.batch,
            left: plan.left.clone(),
            priority: plan.priority,
            authorization: plan.authorization.clone(),
            address: plan.address.clone(),
            channel: plan.channel,
            by_reference: plan.by_reference,
            key_prefix: format!("bench-{}-{task}", plan.run_id),
            first_n: task as u64 * 1_000_000_000,
        };
        tasks.push(match plan.rate {
            None => tokio::spawn(worker.closed_loop(deadline)),
            Some(rate) => {
                // Each task offers rate/connections; starts are staggered across one period so
                // the tasks do not fire in lockstep.
                let period = Duration::from_secs_f64(plan.connections as f64 / rate as f64)
                    .max(Duration::from_nanos(1));
                let first = started + period.mul_f64(task as f64 / plan.connections as f64);
                tokio::spawn(worker.open_loop(first, period, deadline))
            }
        });
    }
    let mut total = TaskResult::new()?;
    for result in futures::future::join_all(tasks).await {
        let r = result.context("a load task failed")??;
        total.requests += r.requests;
        total.accepted += r.accepted;
        total.duplicates += r.duplicates;
        total.transport_errors += r.transport_errors;
        for (status, n) in r.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        total.latency_us.add(&r.latency_us).context("merging latency histograms")?;
    }
    let stats = AcceptStats {
        accepted: total.accepted,
        duplicates: total.duplicates,
        statuses: total.statuses,
        transport_errors: total.transport_errors,
        first_error: total.first_error,
        elapsed: started.elapsed(),
        requests: total.requests,
        latency_us: total.latency_us,
    };
    eprintln!(
        "bench: accepted {} in {:.2} s = {:.0}/s, {} errors",
        stats.accepted,
        stats.elapsed.as_secs_f64(),
        stats.per_second(),
        stats.errors()
    );
    Ok(stats)
}

/// The JSON of request `n` on `channel`.
fn request_body(channel: BenchChannel, by_reference: bool, address: &str, n: u64) -> String {
    let name = channel.channel().as_str();
    if by_reference {
        return format!(
            r#"{{"recipient":{{"user_id":"{BENCH_USER}"}},"channels":["{name}"],"template":"{BENCH_TEMPLATE}","data":{{"n":{n}}}}}"#
        );
    }
    let (field, content) = match channel {
        BenchChannel::Webhook => ("webhook_url", r#"{"title":"bench","body":"hello"}"#),
        BenchChannel::Email => ("email", r#"{"subject":"bench","body":"hello"}"#),
        BenchChannel::Sms => ("phone", r#"{"body":"hello"}"#),
    };
    format!(
        r#"{{"recipient":{{"{field}":"{address}"}},"channels":["{name}"],"content":{content},"data":{{"n":{n}}}}}"#
    )
}

/// One connection's worth of load.
///
/// Each task speaks HTTP/1.1 over its own keep-alive connection with hyper's bare client: the
/// load generator shares the machine with what it measures, so it should cost as little CPU
/// per request as possible (reqwest's conveniences roughly halved the measured rate).
struct LoadTask {
    /// The open connection, made on first use and again after an error.
    connection: Option<SendRequest<Full<Bytes>>>,
    /// `host:port` of the gateway.
    authority: String,
    /// Path of `POST /v1/notifications` (or its `/batch`).
    path: String,
    /// Notifications per batch request, if batches are sent.
    batch: Option<usize>,
    /// With `--count`: the notifications still to send, shared by the tasks.
    left: Option<Arc<AtomicU64>>,
    priority: Option<&'static str>,
    authorization: HeaderValue,
    address: String,
    channel: BenchChannel,
    /// Name the bench user and template instead of the sink and inline content.
    by_reference: bool,
    key_prefix: String,
    /// The `data.n` of this task's first request (tasks use disjoint ranges).
    first_n: u64,
}

impl LoadTask {
    /// As fast as the gateway answers: the next request goes when the last one is answered.
    async fn closed_loop(mut self, deadline: tokio::time::Instant) -> anyhow::Result<TaskResult> {
        let mut result = TaskResult::new()?;
        let mut i = 0u64;
        while tokio::time::Instant::now() < deadline {
            let sent = tokio::time::Instant::now();
            if !self.send(i, sent, &mut result).await {
                break;
            }
            i += 1;
        }
        Ok(result)
    }

    /// How many notifications request `i` carries: the batch size, or fewer (none) once
    /// `--count` is nearly (all) sent.
    fn take(&self) -> u64 {
        let want = self.batch.unwrap_or(1) as u64;
        match &self.left {
            Some(left) => claim(left, want),
            None => want,
        }
    }

    /// At a fixed rate whatever the gateway does. A late answer delays the next send, but the
    /// next request's latency is still counted from when it should have been sent, so a stall
    /// shows up in the percentiles instead of silently lowering the offered load (no
    /// coordinated omission).
    async fn open_loop(
        mut self,
        first: tokio::time::Instant,
        period: Duration,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<TaskResult> {
        let mut result = TaskResult::new()?;
        let mut ticks = tokio::time::interval_at(first, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut i = 0u64;
        loop {
            let scheduled = ticks.tick().await;
            if scheduled >= deadline {
                break;
            }
            self.send(i, scheduled, &mut result).await;
            i += 1;
        }
        Ok(result)
    }

    /// Sends request `i` and records its outcome, with latency counted from `since`; false
    /// once `--count` is all sent.
    async fn send(&mut self, i: u64, since: tokio::time::Instant, result: &mut TaskResult) -> bool {
        let items = self.take();
        if items == 0 {
            return false;
        }
        let key = format!("{}-{i}", self.key_prefix);
        let body = match self.batch {
            None => request_body(self.channel, self.by_reference, &self.address, self.first_n + i),
            Some(size) => batch_body(
                self.channel,
                self.by_reference,
                &self.address,
                self.first_n + i * size as u64,
                items,
                &key,
            ),
        };
        let body = with_priority(body, self.priority);
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.post(body, key)).await;
        let outcome = match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
        };
        result.requests += 1;
        match outcome {
            Ok((202, body)) => {
                let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                result.latency_us.saturating_record(micros.max(1));
                if contains(&body, b"\"duplicate\":true") {
                    result.duplicates += 1;
                } else {
                    result.accepted += 1;
                }
            }
            Ok((200, body)) if self.batch.is_some() => {
                let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                result.latency_us.saturating_record(micros.max(1));
                match BatchCounts::parse(&body) {
                    Some(c) => {
                        result.accepted += c.accepted;
                        result.duplicates += c.duplicates;
                        let attributed: u64 = c.failures.values().sum();
                        for (status, n) in c.failures {
                            *result.statuses.entry(status).or_default() += n;
                        }
                        // Failures the results did not give a status for stay under the batch's.
                        if c.failed > attributed {
                            *result.statuses.entry(200).or_default() += c.failed - attributed;
                        }
                        if c.failed > 0 && result.first_error.is_none() {
                            result.first_error = Some(match c.first_failure {
                                Some(e) => format!("a batch item failed with {e}"),
                                None => format!("a batch item failed: {}", String::from_utf8_lossy(&body)),
                            });
                        }
                    }
                    None => {
                        *result.statuses.entry(200).or_default() += items;
                        result.first_error.get_or_insert_with(|| {
                            format!("an unreadable batch answer: {}", String::from_utf8_lossy(&body))
                        });
                    }
                }
            }
            Ok((status, body)) => {
                *result.statuses.entry(status).or_default() += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
            }
            Err(e) => {
                // The connection is in an unknown state: open a new one for the next request.
                self.connection = None;
                result.transport_errors += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(e);
                }
            }
        }
        true
    }

    /// One POST on this task's connection (opened if needed); returns status and body.
    async fn post(&mut self, body: String, key: String) -> anyhow::Result<(u16, Bytes)> {
        if self.connection.as_ref().is_none_or(|c| c.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to {}", self.authority))?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            self.connection = Some(sender);
        }
        let sender = self.connection.as_mut().expect("connected above");
        sender.ready().await?;
        let request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Takes up to `want` from what is `left` to send, shared by every task, so that together they
/// send exactly the count; 0 once it is all taken.
fn claim(left: &AtomicU64, want: u64) -> u64 {
    match left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n > 0).then(|| n - want.min(n))) {
        Ok(before) => want.min(before),
        Err(_) => 0,
    }
}

/// What a batch answer (`200` from `POST /v1/notifications/batch`) says.
#[derive(Debug, PartialEq, Eq)]
struct BatchCounts {
    /// Items answered 202 (new notifications).
    accepted: u64,
    /// Items answered 200 (an earlier notification with the same key).
    duplicates: u64,
    /// Items answered with an error.
    failed: u64,
    /// The failed items by their own status, so a batch of 429s reads as 429s, not as the
    /// batch's 200.
    failures: BTreeMap<u16, u64>,
    /// The first failed item's `error` object, to say what went wrong.
    first_failure: Option<String>,
}

impl BatchCounts {
    /// The totals, and the failed items' statuses from `results`. None when the answer lacks
    /// the totals (not the batch contract).
    fn parse(body: &[u8]) -> Option<BatchCounts> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        let mut counts = BatchCounts {
            accepted: n("accepted")?,
            duplicates: n("duplicates")?,
            failed: n("failed")?,
            failures: BTreeMap::new(),
            first_failure: None,
        };
        let results = v.get("results").and_then(serde_json::Value::as_array).map(Vec::as_slice);
        for item in results.unwrap_or_default() {
            let status = item.get("status").and_then(serde_json::Value::as_u64);
            let Some(status) = status.and_then(|s| u16::try_from(s).ok()).filter(|s| *s >= 300) else {
                continue;
            };
            *counts.failures.entry(status).or_default() += 1;
            counts.first_failure.get_or_insert_with(|| format!("{status}: {}", item["error"]));
        }
        Some(counts)
    }
}

/// A batch of `items` notifications starting at `data.n = first`, keyed `<key>-<j>`.
fn batch_body(
    channel: BenchChannel,
    by_reference: bool,
    address: &str,
    first: u64,
    items: u64,
    key: &str,
) -> String {
    let mut body = String::with_capacity(items as usize * 160 + 20);
    body.push_str(r#"{"notifications":["#);
    for j in 0..items {
        if j > 0 {
            body.push(',');
        }
        let item = request_body(channel, by_reference, address, first + j);
        // Each notification carries its own key, as a client retrying the batch would.
        body.push_str(&format!(r#"{{"idempotency_key":"{key}-{j}","#));
        body.push_str(&item[1..]);
    }
    body.push_str("]}");
    body
}

/// `body` (one notification or a batch) with `priority` on every notification.
fn with_priority(body: String, priority: Option<&str>) -> String {
    match priority {
        // Every notification has one `recipient`; its priority goes beside it.
        Some(p) => body.replace(r#""recipient":"#, &format!(r#""priority":"{p}","recipient":"#)),
        None => body,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// End to end

/// Waits until the sink has seen `expected` distinct notifications or `timeout` passes.
async fn await_delivery(sink: &Sink, expected: u64, started: Instant, timeout: Duration) -> Delivery {
    eprintln!("bench: waiting for {expected} deliveries to the sink (up to {} s)", timeout.as_secs());
    let deadline = Instant::now() + timeout;
    while sink.delivered() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivery = Delivery {
        expected,
        delivered: sink.delivered(),
        posts: sink.state.posts.load(Ordering::Acquire),
        span: sink.last_delivery().map(|last| last.saturating_duration_since(started)),
        complete: sink.delivered() >= expected,
        timeout,
    };
    match delivery.per_second() {
        Some(rate) => eprintln!("bench: delivered {} = {rate:.0}/s end to end", delivery.delivered),
        None => eprintln!(
            "bench: only {} of {expected} delivered within {} s",
            delivery.delivered,
            timeout.as_secs()
        ),
    }
    delivery
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// ` (0.42 × raw)` when the raw rate is known.
struct Ratio(Option<f64>);

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(r) => write!(f, "  ({r:.2} × raw JetStream)"),
            None => Ok(()),
        }
    }
}

impl BenchReport {
    fn ratio(&self, rate: f64) -> Ratio {
        Ratio(self.raw.as_ref().map(RawPublish::per_second).filter(|r| *r > 0.0).map(|raw| rate / raw))
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::PrivateStack { ready_in, nats } => {
                let what = match (&self.delivery, &self.priority) {
                    (None, None) => "herald gateway only".to_owned(),
                    _ => format!("herald up = gateway + {} worker", self.channel),
                };
                writeln!(f, "herald bench: private stack ({what}, {nats})")?;
                writeln!(f, "  stack ready in     {} ms", ready_in.as_millis())?;
            }
            Target::External { url } => writeln!(f, "herald bench: gateway at {url}")?,
        }
        let mode = match self.rate {
            Some(rate) => format!("open loop at {rate} req/s offered"),
            None => "closed loop".to_owned(),
        };
        let mode = if self.by_reference {
            format!("{mode}, by user and template")
        } else {
            format!("{mode}, inline content")
        };
        let mode = match self.batch {
            Some(size) => format!("{mode}, batches of {size} (POST /v1/notifications/batch)"),
            None => mode,
        };
        let amount = match self.count {
            Some(n) => format!("{n} notifications"),
            None => format!("{:.1} s", self.duration.as_secs_f64()),
        };
        writeln!(
            f,
            "  load               {} connections, {amount}, {mode}, {} channel; intent payload {} B; default logging",
            self.connections, self.channel, self.payload_bytes
        )?;
        match &self.raw {
            Some(raw) => writeln!(
                f,
                "  raw JetStream      {:.0} msg/s ({} publishes in {:.2} s, R{} stream)",
                raw.per_second(),
                raw.messages,
                raw.elapsed.as_secs_f64(),
                raw.replicas
            )?,
            None => writeln!(f, "  raw JetStream      not measured")?,
        }

        let a = &self.accept;
        writeln!(
            f,
            "  accepted           {:.0}/s ({} in {:.2} s){}",
            a.per_second(),
            a.accepted,
            a.elapsed.as_secs_f64(),
            self.ratio(a.per_second())
        )?;
        if self.batch.is_some() {
            writeln!(
                f,
                "  requests           {:.0}/s ({} batch requests)",
                per_second(a.requests, a.elapsed),
                a.requests
            )?;
        }
        if !a.latency_us.is_empty() {
            let q = |q: f64| ms(a.latency_us.value_at_quantile(q));
            writeln!(
                f,
                "  accept latency     p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms{}",
                q(0.5),
                q(0.99),
                q(0.999),
                ms(a.latency_us.max()),
                if self.rate.is_some() { " (from scheduled send)" } else { "" }
            )?;
        }
        if a.errors() == 0 && a.duplicates == 0 {
            writeln!(f, "  errors             none")?;
        } else {
            let mut parts: Vec<String> = a.statuses.iter().map(|(s, n)| format!("{n} × {s}")).collect();
            if a.transport_errors > 0 {
                parts.push(format!("{} transport", a.transport_errors));
            }
            if a.duplicates > 0 {
                parts.push(format!("{} unexpected duplicates", a.duplicates));
            }
            writeln!(f, "  errors             {}", parts.join(", "))?;
            if let Some(e) = &a.first_error {
                writeln!(f, "  first error        {}", e.chars().take(300).collect::<String>())?;
            }
        }

        if let Some(p) = &self.priority {
            self.fmt_priority(f, p)?;
            return self.fmt_memory(f);
        }
        let Some(d) = &self.delivery else {
            writeln!(f, "  end to end         not measured (gateway only)")?;
            return self.fmt_memory(f);
        };
        match d.per_second() {
            _ if d.expected == 0 => writeln!(f, "  end to end         nothing was accepted")?,
            Some(rate) => writeln!(
                f,
                "  end to end         {rate:.0}/s ({} delivered by {:.2} s after the accept phase began){}",
                d.delivered,
                d.span.unwrap_or_default().as_secs_f64(),
                self.ratio(rate)
            )?,
            None => writeln!(
                f,
                "  end to end         INCOMPLETE: {} of {} delivered within {} s",
                d.delivered,
                d.expected,
                d.timeout.as_secs()
            )?,
        }
        if d.posts > d.delivered {
            writeln!(f, "  redeliveries       {}", d.posts - d.delivered)?;
        }
        self.fmt_memory(f)
    }
}

impl BenchReport {
    /// The priority-lanes figures, in place of end to end: the accept lines above are the
    /// backlog's.
    fn fmt_priority(&self, f: &mut fmt::Formatter<'_>, p: &PriorityStats) -> fmt::Result {
        writeln!(
            f,
            "  priority lanes     {} low queued for a receiver answering in {} ms; {} critical, one every {} ms, to a fast one",
            p.backlog,
            SLOW_ANSWER.as_millis(),
            p.probes,
            p.every.as_millis()
        )?;
        writeln!(
            f,
            "  critical           {} of {} answered 202, {} of those arrived, {} never did (waited {} s after the last answer)",
            p.accepted,
            p.probes,
            p.arrived,
            p.accepted - p.arrived,
            PROBE_TIMEOUT.as_secs()
        )?;
        if p.arrived > 0 {
            let quantiles = |h: &Histogram<u64>| {
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max())
                )
            };
            writeln!(
                f,
                "  accepted → arrived {} ({} arrived before their 202 was read)",
                quantiles(&p.from_acceptance_us),
                p.before_acceptance
            )?;
            writeln!(f, "  sent → arrived     {}", quantiles(&p.from_request_us))?;
        }
        writeln!(
            f,
            "  backlog            {} of {} delivered meanwhile (not waited for)",
            p.backlog_delivered, p.backlog
        )?;
        Ok(())
    }

    fn fmt_memory(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.memory {
            let what = if self.delivery.is_some() || self.priority.is_some() {
                "herald up: gateway and worker"
            } else {
                "herald gateway"
            };
            writeln!(
                f,
                "  memory             peak {:.1} MB (VmHWM), now {:.1} MB (VmRSS) of {what}",
                mib(m.peak_kib),
                mib(m.current_kib)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_of_this_process_is_read() {
        let m = Memory::of_process(std::process::id()).unwrap();
        assert!(m.peak_kib > 0 && m.peak_kib >= m.current_kib, "{m:?}");
    }

    #[tokio::test]
    async fn the_sink_counts_distinct_notifications() {
        let sink = Sink::start().await.unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for id in ["a", "a", "b"] {
            let r = client
                .post(format!("{}{HOOK_PATH}", sink.url))
                .header(intent::headers::NOTIFICATION_ID, id)
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::OK);
        }
        assert_eq!(sink.delivered(), 2);
        assert_eq!(sink.state.posts.load(Ordering::Acquire), 3);
        assert!(sink.last_delivery().is_some());
        sink.stop();
    }

    #[tokio::test]
    async fn the_smtp_sink_takes_mail_and_counts_distinct_notifications() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let sink = Sink::start_smtp().await.unwrap();
        let addr = sink.url.strip_prefix("smtp://").unwrap().strip_suffix("?tls=none").unwrap().to_owned();
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        async fn expect(read: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>, code: &str) {
            // Multi-line replies: read until the line with a space after the code.
            loop {
                let mut line = String::new();
                read.read_line(&mut line).await.unwrap();
                assert!(line.starts_with(code), "expected {code}, got {line:?}");
                if line.as_bytes().get(3) == Some(&b' ') {
                    break;
                }
            }
        }
        expect(&mut read, "220").await;
        write.write_all(b"EHLO client.test\r\n").await.unwrap();
        expect(&mut read, "250").await;
        for id in ["a", "a", "b"] {
            write.write_all(b"MAIL FROM:<bench@herald.test>\r\n").await.unwrap();
            expect(&mut read, "250").await;
            write.write_all(b"RCPT TO:<reader@bench.test>\r\n").await.unwrap();
            expect(&mut read, "250").await;
            write.write_all(b"DATA\r\n").await.unwrap();
            expect(&mut read, "354").await;
            let message =
                format!("Subject: x\r\nHerald-Notification-Id: {id}\r\n\r\nhello\r\n..dot-stuffed\r\n.\r\n");
            write.write_all(message.as_bytes()).await.unwrap();
            expect(&mut read, "250").await;
        }
        write.write_all(b"QUIT\r\n").await.unwrap();
        expect(&mut read, "221").await;
        assert_eq!(sink.delivered(), 2);
        assert_eq!(sink.state.posts.load(Ordering::Acquire), 3);
        sink.stop();
    }

    #[tokio::test]
    async fn the_sms_sink_answers_like_twilio() {
        let sink = Sink::start_sms().await.unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("{}/2010-04-01/Accounts/{BENCH_TWILIO_SID}/Messages.json", sink.url);
        let r = client.post(&url).form(&[("To", "+15005550009"), ("Body", "hello")]).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["sid"].as_str().unwrap().starts_with("SM"), "{body}");
        assert_eq!(body["status"], "queued");
        assert_eq!(body["num_segments"], "1");
        let r = client.post(format!("{}/elsewhere", sink.url)).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
        assert_eq!(sink.delivered(), 1);
        sink.stop();
    }

    #[test]
    fn request_bodies_address_each_channel() {
        let check = |channel, by_reference, expected: &str| {
            let body = request_body(channel, by_reference, "ADDR", 7);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(body.contains(expected), "{body}");
            assert_eq!(v["channels"][0], channel.to_string());
        };
        check(BenchChannel::Webhook, false, r#""webhook_url":"ADDR""#);
        check(BenchChannel::Email, false, r#""email":"ADDR""#);
        check(BenchChannel::Sms, false, r#""phone":"ADDR""#);
        check(BenchChannel::Email, true, r#""template":"bench""#);
        assert_eq!("email".parse::<BenchChannel>(), Ok(BenchChannel::Email));
        assert!("pigeon".parse::<BenchChannel>().is_err());
    }

    #[tokio::test]
    async fn raw_publish_measures_and_removes_its_stream() {
        let server = NatsServer::for_test();
        let raw = raw_publish(&server.url(), 1, 2_000, 300).await.unwrap();
        assert_eq!(raw.messages, 2_000);
        assert!(raw.per_second() > 0.0);
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        assert!(js.get_stream(BENCH_STREAM).await.is_err(), "the scratch stream is deleted");
    }

    #[test]
    fn the_report_shows_ratios_to_the_raw_rate() {
        let mut latency_us = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
        latency_us.record(1500).unwrap();
        let report = BenchReport {
            target: Target::PrivateStack {
                ready_in: Duration::from_millis(420),
                nats: NatsSetup { nodes: 3, sync: SyncPolicy::Always },
            },
            connections: 32,
            duration: Duration::from_secs(10),
            rate: None,
            payload_bytes: 300,
            raw: Some(RawPublish { messages: 100_000, replicas: 3, elapsed: Duration::from_secs(1) }),
            accept: AcceptStats {
                accepted: 300_000,
                duplicates: 0,
                statuses: BTreeMap::from([(503, 2)]),
                transport_errors: 1,
                first_error: Some("503 Service Unavailable".into()),
                elapsed: Duration::from_secs(10),
                requests: 300_003,
                latency_us,
            },
            delivery: Some(Delivery {
                expected: 300_000,
                delivered: 300_000,
                posts: 300_000,
                span: Some(Duration::from_secs(15)),
                complete: true,
                timeout: DELIVERY_TIMEOUT,
            }),
            memory: Some(Memory { peak_kib: 40 * 1024, current_kib: 30 * 1024 }),
            by_reference: true,
            channel: BenchChannel::Email,
            batch: None,
            count: None,
            priority: None,
        };
        let text = report.to_string();
        for expected in [
            "ready in     420 ms",
            "local 3-node nats cluster, streams R3, sync_interval always",
            "100000 msg/s",
            "R3 stream",
            "30000/s",
            "(0.30 × raw JetStream)",
            "20000/s",
            "(0.20 × raw JetStream)",
            "p50 1.50 ms",
            "2 × 503, 1 transport",
            "peak 40.0 MB",
            "by user and template",
            "email channel",
            "gateway + email worker",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_batch_body_carries_a_key_and_the_priority_per_notification() {
        let body = batch_body(BenchChannel::Webhook, false, "http://127.0.0.1:1/hook", 10, 3, "k-7");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let items = v["notifications"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[2]["idempotency_key"], "k-7-2");
        assert_eq!(items[2]["data"]["n"], 12);
        assert_eq!(items[0]["recipient"]["webhook_url"], "http://127.0.0.1:1/hook");
        let low: serde_json::Value = serde_json::from_str(&with_priority(body, Some("low"))).unwrap();
        let items = low["notifications"].as_array().unwrap();
        assert!(items.iter().all(|item| item["priority"] == "low"), "{low}");
        assert_eq!(items[1]["idempotency_key"], "k-7-1");
    }

    #[test]
    fn batch_answers_are_counted_by_item() {
        // Accepted, duplicates, failed, and the failures by status.
        type Counted<'a> = (u64, u64, u64, &'a [(u16, u64)]);
        let check = |answer: &str, expected: Option<Counted>| {
            let parsed = BatchCounts::parse(answer.as_bytes());
            let got = parsed.as_ref().map(|c| {
                let failures: Vec<(u16, u64)> = c.failures.iter().map(|(s, n)| (*s, *n)).collect();
                (c.accepted, c.duplicates, c.failed, failures)
            });
            let expected = expected.map(|(a, d, f, by)| (a, d, f, by.to_vec()));
            assert_eq!(got, expected, "{answer}");
        };
        check(
            r#"{"results":[{"status":202,"id":"a","duplicate":false},{"status":200,"id":"b","duplicate":true}],
                "accepted":1,"duplicates":1,"failed":0}"#,
            Some((1, 1, 0, &[])),
        );
        check(
            r#"{"results":[{"status":202,"id":"a","duplicate":false},
                {"status":429,"error":{"code":"rate_limited","message":"slow down"}},
                {"status":422,"error":{"code":"invalid","message":"no","field":"recipient"}},
                {"status":429,"error":{"code":"rate_limited","message":"slow down"}}],
                "accepted":1,"duplicates":0,"failed":3}"#,
            Some((1, 0, 3, &[(422, 1), (429, 2)])),
        );
        // Totals without results still count; the failures then have no status of their own.
        check(r#"{"accepted":0,"duplicates":0,"failed":2}"#, Some((0, 0, 2, &[])));
        check(r#"{"results":[]}"#, None);
        check("not json", None);
        let first = BatchCounts::parse(
            br#"{"results":[{"status":503,"error":{"code":"not_stored"}}],"accepted":0,"duplicates":0,"failed":1}"#,
        )
        .unwrap()
        .first_failure
        .unwrap();
        assert!(first.starts_with("503: ") && first.contains("not_stored"), "{first}");
    }

    #[test]
    fn a_count_is_shared_out_exactly() {
        let left = AtomicU64::new(2_500);
        let taken: Vec<u64> = (0..5).map(|_| claim(&left, 1_000)).collect();
        assert_eq!(taken, [1_000, 1_000, 500, 0, 0]);
        let left = AtomicU64::new(3);
        assert_eq!((0..4).map(|_| claim(&left, 1)).sum::<u64>(), 3);
    }

    fn options() -> BenchOptions {
        BenchOptions {
            url: None,
            nats_url: None,
            connections: 32,
            duration: Duration::from_secs(10),
            rate: None,
            raw_messages: 100_000,
            herald_exe: PathBuf::from("herald"),
            gateway_only: false,
            sync: SyncPolicy::Periodic,
            cluster: false,
            replicas: 1,
            by_reference: false,
            channel: BenchChannel::Webhook,
            batch: None,
            count: None,
            priority_backlog: None,
            critical: 200,
            critical_every: Duration::from_millis(50),
        }
    }

    #[test]
    fn options_that_cannot_measure_are_refused() {
        let check = |change: &dyn Fn(&mut BenchOptions), refusal: Option<&str>| {
            let mut o = options();
            change(&mut o);
            match (check_options(&o), refusal) {
                (Ok(()), None) => {}
                (Err(e), Some(words)) => assert!(e.to_string().contains(words), "{e} lacks {words:?}"),
                (got, want) => panic!("{got:?} for {o:?}, expected refusal {want:?}"),
            }
        };
        check(&|_| {}, None);
        check(&|o| o.connections = 0, Some("--connections"));
        check(&|o| o.duration = Duration::ZERO, Some("--duration"));
        check(&|o| o.rate = Some(0), Some("--rate"));
        check(&|o| o.batch = Some(1), None);
        check(&|o| o.batch = Some(1000), None);
        check(&|o| o.batch = Some(0), Some("1 to 1000"));
        check(&|o| o.batch = Some(1001), Some("1 to 1000"));
        check(
            &|o| {
                o.batch = Some(1000);
                o.count = Some(1_000_000);
            },
            None,
        );
        check(&|o| o.count = Some(0), Some("--count"));
        check(
            &|o| {
                o.count = Some(10);
                o.rate = Some(10);
            },
            Some("--rate"),
        );
        check(
            &|o| {
                o.url = Some("http://127.0.0.1:8080".into());
                o.channel = BenchChannel::Email;
            },
            Some("private stack"),
        );
        check(
            &|o| {
                o.url = Some("http://127.0.0.1:8080".into());
                o.cluster = true;
            },
            Some("--url"),
        );
        check(&|o| o.priority_backlog = Some(100_000), None);
        check(&|o| o.priority_backlog = Some(0), None);
        for (change, flag) in [
            (&(|o: &mut BenchOptions| o.batch = Some(10)) as &dyn Fn(&mut BenchOptions), "--batch"),
            (&|o: &mut BenchOptions| o.count = Some(10), "--count"),
            (&|o: &mut BenchOptions| o.rate = Some(10), "--rate"),
            (&|o: &mut BenchOptions| o.by_reference = true, "--by-reference"),
            (&|o: &mut BenchOptions| o.gateway_only = true, "--gateway-only"),
            (&|o: &mut BenchOptions| o.channel = BenchChannel::Sms, "--channel"),
            (&|o: &mut BenchOptions| o.critical = 0, "--critical"),
            (&|o: &mut BenchOptions| o.critical_every = Duration::ZERO, "--critical-every"),
        ] {
            check(
                &|o| {
                    o.priority_backlog = Some(1_000);
                    change(o);
                },
                Some(flag),
            );
        }
    }

    #[test]
    fn probes_are_timed_from_acceptance_and_from_request() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let probe =
            |id: &str, sent, accepted| Probe { id: id.into(), sent: at(sent), accepted: at(accepted) };
        let probes = [probe("a", 0, 5), probe("b", 50, 54), probe("c", 100, 106), probe("lost", 150, 152)];
        let arrivals = std::collections::HashMap::from([
            ("a".to_owned(), at(15)),
            // The worker can deliver before the gateway's answer is read.
            ("b".to_owned(), at(53)),
            ("c".to_owned(), at(146)),
            ("not ours".to_owned(), at(1)),
        ]);
        let t = time_probes(&probes, &arrivals).unwrap();
        assert_eq!((t.arrived, t.before_acceptance), (3, 1));
        let close = |h: &Histogram<u64>, ms: u64| h.equivalent(h.max(), ms * 1000);
        assert!(close(&t.from_acceptance_us, 40), "{}", t.from_acceptance_us.max());
        assert!(close(&t.from_request_us, 46), "{}", t.from_request_us.max());
        assert!(t.from_acceptance_us.min() <= 1, "the early arrival counts as no time");
        assert_eq!(t.from_request_us.len(), 3);
    }

    #[test]
    fn the_priority_report_says_what_was_timed_and_what_never_arrived() {
        let histogram = |values: &[u64]| {
            let mut h = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
            values.iter().for_each(|v| h.record(*v).unwrap());
            h
        };
        let report = BenchReport {
            target: Target::PrivateStack {
                ready_in: Duration::from_millis(300),
                nats: NatsSetup { nodes: 1, sync: SyncPolicy::Periodic },
            },
            connections: 8,
            duration: Duration::from_secs(10),
            rate: None,
            payload_bytes: 300,
            raw: Some(RawPublish { messages: 100_000, replicas: 1, elapsed: Duration::from_secs(1) }),
            accept: AcceptStats {
                accepted: 20_000,
                duplicates: 0,
                statuses: BTreeMap::new(),
                transport_errors: 0,
                first_error: None,
                elapsed: Duration::from_secs(2),
                requests: 20,
                latency_us: histogram(&[500_000]),
            },
            delivery: None,
            memory: Some(Memory { peak_kib: 100 * 1024, current_kib: 60 * 1024 }),
            by_reference: false,
            channel: BenchChannel::Webhook,
            batch: Some(1000),
            count: Some(20_000),
            priority: Some(PriorityStats {
                backlog: 20_000,
                probes: 200,
                every: Duration::from_millis(50),
                accepted: 199,
                arrived: 197,
                from_acceptance_us: histogram(&[2_000, 3_000, 8_000]),
                from_request_us: histogram(&[4_000, 5_000, 11_000]),
                before_acceptance: 4,
                backlog_delivered: 310,
            }),
        };
        let text = report.to_string();
        for expected in [
            "gateway + webhook worker",
            "20000 low queued for a receiver answering in 200 ms; 200 critical, one every 50 ms",
            "199 of 200 answered 202, 197 of those arrived, 2 never did",
            "accepted → arrived p50 3.00 ms",
            "max 8.00 ms (4 arrived before their 202 was read)",
            "sent → arrived     p50 5.00 ms",
            "310 of 20000 delivered meanwhile",
            "of herald up: gateway and worker",
            "10000/s (20000 in 2.00 s)  (0.10 × raw JetStream)",
            "10/s (20 batch requests)",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        assert!(!text.contains("gateway only"), "{text}");
    }
}
