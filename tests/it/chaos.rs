//! The kill test: steady load while every process is SIGKILLed and restarted at random moments.
//!
//! About 60 requests/s go to a `herald gateway` process, `herald worker` processes deliver them
//! to a webhook receiver in this test that records every POST (and answers after 0–30 ms, so
//! kills land mid-send), and every 1.5–4 s one of nats-server, the gateway or the worker is
//! killed with SIGKILL and started again; sometimes a second worker is started, and killed
//! later. Each of nats-server, gateway and worker is killed at least twice. A request that
//! meets a dead gateway (connection error, 503, timeout) is retried with the same
//! `Idempotency-Key` until it gets its 202.
//!
//! Afterwards, with every process up, it waits (a deadline, not a sleep) until each
//! notification that got a 202 has an outcome in the delivery ledger, and checks DESIGN.md's
//! "Delivery semantics" from the outside:
//!
//! - nothing is lost: each accepted notification is `delivered`, or `dead_lettered` with its
//!   intent in HERALD_DLQ under a `Herald-Dlq-Reason`;
//! - each delivered notification reached the receiver;
//! - `HERALD_UNCERTAIN=park`: no notification reached the receiver twice;
//! - `HERALD_UNCERTAIN=resend`: a repeat carries the same `Idempotency-Key` (the receiver keys
//!   on it and checks it against the body's id), and for each notification received n > 1
//!   times the ledger counts at least n − 1 resends, i.e. every repeat was sent by a handler
//!   that took over a claim whose owner let it lapse without recording an outcome.
//!
//! It prints the counts (accepted, delivered, dead-lettered by reason, repeats, kills per kind,
//! requests given up) and the kill log; on a failure it also prints, for the notifications at
//! fault, their ledger entries, when the receiver got them, the kills around that and every log
//! line naming them, then the tails of all process logs, and keeps the temporary directory
//! (process logs, nats-server store).
//!
//! - `chaos_single_node_park`, `chaos_single_node_resend`: 25 s of load each, with the suite.
//! - `chaos_single_node_park_long`, `chaos_single_node_resend_long`: 5 minutes of load each,
//!   `#[ignore]`d; run them with `cargo test --test it chaos -- --ignored --nocapture`.
//!
//! The moments and targets of the kills come from a seed printed at the start;
//! `CHAOS_SEED=<seed>` replays that schedule (the processes' own timing cannot be replayed).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use futures::StreamExt;
use herald_shared::{
    Channel, Config, Intent, auth, config,
    deadletter::headers as dlq,
    ledger::{Entry, Ledger, LedgerKey},
    nats_server::{Locator, NatsServer, ServerOptions},
    state::Status,
    topology::{self, DLQ_STREAM, NOTIFICATIONS_BUCKET},
};
use poem::{EndpointExt, Request, Route, handler, http::StatusCode, listener::TcpAcceptor, post, web::Data};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::support::{TENANT, WEBHOOK_SECRET, eventually, webhook_body};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const JWT_SECRET: &str = "chaos-jwt-secret";
/// Requests per second offered to the gateway.
const RATE: u32 = 60;
/// Kills of each kind (nats-server, gateway, worker) a run makes at least.
const MIN_KILLS: usize = 2;
/// How long a request that has not got its 202 is still retried after the load ends (and every
/// process is up again) before it is counted as given up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// The longest the accepted notifications may take to settle once the load ends.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// How many notifications of each kind of failure get their evidence printed.
const EVIDENCE_FOR: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_single_node_park() {
    chaos("park", Duration::from_secs(25)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_single_node_resend() {
    chaos("resend", Duration::from_secs(25)).await;
}

/// Five minutes of load and kills; see the module documentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "5 minutes: cargo test --test it chaos -- --ignored --nocapture"]
async fn chaos_single_node_park_long() {
    chaos("park", Duration::from_secs(300)).await;
}

/// Five minutes of load and kills; see the module documentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "5 minutes: cargo test --test it chaos -- --ignored --nocapture"]
async fn chaos_single_node_resend_long() {
    chaos("resend", Duration::from_secs(300)).await;
}

/// One run: `uncertain` is `HERALD_UNCERTAIN` (`park` or `resend`), `load_for` how long the
/// load and the kills go on (longer if the minimum of kills is not reached by then).
async fn chaos(uncertain: &str, load_for: Duration) {
    let t0 = Instant::now();
    let seed = seed();
    println!(
        "chaos {uncertain}: seed {seed} (CHAOS_SEED={seed} replays the kill schedule), {}s of load",
        load_for.as_secs()
    );
    let mut rng = Rng(seed);
    let receiver = Receiver::start(seed, t0).await;
    let mut cluster = Cluster::start(uncertain, t0).await;

    let load = Arc::new(Load::new(&cluster, &receiver.url, seed));
    let stop = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let driver = tokio::spawn(drive(load.clone(), stop.clone()));
    cluster.rampage(&mut rng, load_for).await;
    stop.store(true, SeqCst);
    let loaded = load_started.elapsed();
    *load.give_up_at.lock().unwrap() = Some(Instant::now() + GIVE_UP_AFTER);
    cluster.check_exits();
    cluster.note("chaos over: every process is up; waiting for the outstanding requests");
    let mut requests = driver.await.unwrap();
    while let Some(done) = requests.join_next().await {
        done.unwrap();
    }
    let answered = load_started.elapsed();
    cluster.note("every request answered or given up; waiting for every accepted notification to settle");

    let accepted: Vec<(String, String)> =
        load.accepted.lock().unwrap().iter().map(|(k, id)| (k.clone(), id.clone())).collect();
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    let (client, js) = topology::connect(&cluster.config, "chaos-test").await.unwrap();
    let kv = js.get_key_value(NOTIFICATIONS_BUCKET).await.unwrap();
    let ledger = Ledger::new(js.clone(), kv, cluster.config.claim_ttl());
    let outcome = settle(&ledger, &js, &ids, Instant::now() + SETTLE_WITHIN).await;
    let settled = load_started.elapsed();
    cluster.check_exits();

    // What the receiver saw, and what must hold.
    let received = receiver.state.got.lock().unwrap().clone();
    let malformed = receiver.state.malformed.lock().unwrap().clone();
    let accepted_ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut delivered = 0;
    let mut dead: BTreeMap<String, usize> = BTreeMap::new();
    let mut lost = Vec::new();
    let mut not_received = Vec::new();
    let mut dead_lettered = 0;
    for id in &ids {
        match outcome.status.get(id) {
            Some(Status::Delivered) => {
                delivered += 1;
                if !received.contains_key(id) {
                    not_received.push(id.clone());
                }
            }
            Some(Status::DeadLettered) => {
                dead_lettered += 1;
                // Without a letter it is listed in `outcome.unparked`.
                for reason in outcome.letters.get(id).into_iter().flatten() {
                    *dead.entry(reason.clone()).or_default() += 1;
                }
            }
            _ => lost.push(id.clone()),
        }
    }
    let mut repeats: Vec<(String, usize)> = received
        .iter()
        .filter(|(id, at)| at.len() > 1 && accepted_ids.contains(id.as_str()))
        .map(|(id, at)| (id.clone(), at.len()))
        .collect();
    repeats.sort();
    let extra: usize = repeats.iter().map(|(_, n)| n - 1).sum();
    let strangers = received.keys().filter(|id| !accepted_ids.contains(id.as_str())).count();
    // One request (one Idempotency-Key, however often retried) is one notification: the id it
    // was answered with, and no other.
    let by_request = receiver.state.by_request.lock().unwrap().clone();
    let answered_as: HashMap<&str, &str> = accepted.iter().map(|(k, id)| (k.as_str(), id.as_str())).collect();
    let mut split: Vec<(&str, Option<&str>, Vec<&str>)> = by_request
        .iter()
        .map(|(key, ids)| {
            (
                key.as_str(),
                answered_as.get(key.as_str()).copied(),
                ids.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .filter(|(_, answer, ids)| ids.len() > 1 || answer.is_some_and(|a| !ids.contains(&a)))
        .collect();
    split.sort();
    // Resends the ledger counts for each repeated notification.
    let mut resends = HashMap::new();
    for (id, _) in &repeats {
        let key = LedgerKey::new(Some(TENANT), id, Channel::Webhook);
        let entry = ledger.read(&key).await.ok().and_then(|(e, _)| e);
        resends.insert(id.clone(), entry.map_or(0, |e| e.resends));
    }
    let unexplained: Vec<&(String, usize)> =
        repeats.iter().filter(|(id, n)| (resends[id] as usize) < n - 1).collect();
    // Informative: whether a worker was killed while each repeat was outstanding.
    let after_worker_kill = repeats
        .iter()
        .filter(|(id, _)| {
            let at = &received[id];
            let (first, last) = (at[0], at[at.len() - 1]);
            cluster
                .kills
                .iter()
                .any(|k| k.kind == Kind::Worker && k.at + Duration::from_millis(50) >= first && k.at <= last)
        })
        .count();

    let given_up = load.given_up.lock().unwrap().clone();
    let refused = load.refused.lock().unwrap().clone();
    let kills = |kind| cluster.kills.iter().filter(|k| k.kind == kind).count();
    println!("---- chaos {uncertain} (seed {seed}) ----");
    for event in &cluster.events {
        println!("  {event}");
    }
    cluster.reported = true;
    println!(
        "requests: {} sent over {:.1}s ({} tries), {} accepted ({} answered as duplicates of an earlier try), \
         {} given up, {} refused",
        load.sent.load(SeqCst),
        loaded.as_secs_f64(),
        load.tries.load(SeqCst),
        ids.len(),
        load.duplicates.load(SeqCst),
        given_up.len(),
        refused.len(),
    );
    println!(
        "outcomes: {delivered} delivered, {dead_lettered} dead-lettered (letters by reason {dead:?}), {} lost \
         (no outcome within {}s)",
        lost.len(),
        SETTLE_WITHIN.as_secs()
    );
    println!(
        "receiver: {} POSTs for {} notifications; {} notifications received more than once ({extra} repeats, \
         {after_worker_kill} of them with a worker killed in between); {} delivered but never received; \
         {strangers} from requests never answered 202; {} requests received as another notification than \
         answered; {} malformed",
        received.values().map(Vec::len).sum::<usize>(),
        received.len(),
        repeats.len(),
        not_received.len(),
        split.len(),
        malformed.len(),
    );
    println!(
        "kills: nats-server {}, gateway {}, worker {} (second worker started {} times); {} unexpected exits",
        kills(Kind::Nats),
        kills(Kind::Gateway),
        kills(Kind::Worker),
        cluster.second_runs,
        cluster.exits.len(),
    );
    println!(
        "timing: load {:.1}s, requests answered at {:.1}s, settled at {:.1}s, whole test {:.1}s",
        loaded.as_secs_f64(),
        answered.as_secs_f64(),
        settled.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    for (id, n) in repeats.iter().take(20) {
        let at: Vec<String> = received[id].iter().map(|d| format!("{:.2}s", d.as_secs_f64())).collect();
        println!("  repeat: {id} received {n} times at {at:?}; the ledger counts {} resends", resends[id]);
    }
    let mut failures = Vec::new();
    let mut evidence = Vec::new();
    if !lost.is_empty() {
        failures
            .push(format!("{} accepted notifications were neither delivered nor dead-lettered", lost.len()));
        evidence.push(("lost", lost.clone()));
    }
    if !outcome.unparked.is_empty() {
        failures.push(format!(
            "{} notifications are dead-lettered in the ledger without a letter in {DLQ_STREAM}",
            outcome.unparked.len()
        ));
        evidence.push(("dead-lettered without a DLQ letter", outcome.unparked.clone()));
    }
    if !not_received.is_empty() {
        failures.push(format!(
            "{} notifications are delivered in the ledger but never reached the receiver",
            not_received.len()
        ));
        evidence.push(("delivered, never received", not_received.clone()));
    }
    if uncertain == "park" && !repeats.is_empty() {
        failures.push(format!(
            "HERALD_UNCERTAIN=park, yet {} notifications reached the receiver more than once",
            repeats.len()
        ));
        evidence.push(("received twice under park", repeats.iter().map(|(id, _)| id.clone()).collect()));
    }
    if uncertain == "resend" && !unexplained.is_empty() {
        failures.push(format!(
            "{} notifications were received more often than one plus their resends in the ledger: {:?}",
            unexplained.len(),
            unexplained
                .iter()
                .map(|(id, n)| format!("{id}: {n} receptions, {} resends", resends[id]))
                .collect::<Vec<_>>()
        ));
        evidence.push(("repeat without a resend", unexplained.iter().map(|(id, _)| id.clone()).collect()));
    }
    if !split.is_empty() {
        failures.push(format!(
            "{} requests were received as more notifications than one, or not as the one answered \
             (request, answered id, received ids): {split:?}",
            split.len()
        ));
        let mut ids: Vec<String> = split
            .iter()
            .flat_map(|(_, answer, ids)| answer.iter().chain(ids).map(|id| id.to_string()))
            .collect();
        ids.sort();
        ids.dedup();
        evidence.push(("one request, several notifications", ids));
    }
    if !malformed.is_empty() {
        failures.push(format!("malformed deliveries: {malformed:?}"));
    }
    if !refused.is_empty() {
        failures.push(format!("requests refused with an unexpected status: {refused:?}"));
    }
    if !cluster.exits.is_empty() {
        failures.push(format!("processes exited without being killed: {:?}", cluster.exits));
    }
    if ids.len() * 2 < load.sent.load(SeqCst) {
        failures.push(format!("only {} of {} requests were accepted", ids.len(), load.sent.load(SeqCst)));
    }
    for kind in [Kind::Nats, Kind::Gateway, Kind::Worker] {
        if kills(kind) < MIN_KILLS {
            failures.push(format!("{kind:?} was killed {} times, fewer than {MIN_KILLS}", kills(kind)));
        }
    }
    if failures.is_empty() {
        drop(client);
        return;
    }
    let key_of: HashMap<&str, &str> = accepted.iter().map(|(k, id)| (id.as_str(), k.as_str())).collect();
    for (what, ids) in evidence {
        println!("==== evidence: {what} ({} notifications, the first {EVIDENCE_FOR} shown) ====", ids.len());
        for id in ids.iter().take(EVIDENCE_FOR) {
            let entry = ledger.read(&LedgerKey::new(Some(TENANT), id, Channel::Webhook)).await;
            let entry = match entry {
                Ok((Some(e), rev)) => format!("rev {rev:?} {}", serde_json::to_string(&e).unwrap()),
                other => format!("{other:?}"),
            };
            let at: Vec<String> =
                received.get(id).into_iter().flatten().map(|d| format!("{:.3}s", d.as_secs_f64())).collect();
            println!("-- {id} (Idempotency-Key {}):", key_of.get(id.as_str()).unwrap_or(&"?"));
            println!("   ledger: {entry}");
            println!("   received at: {at:?}; DLQ letters: {:?}", outcome.letters.get(id));
            if let (Some(first), Some(last)) =
                (received.get(id).and_then(|r| r.first()), received.get(id).and_then(|r| r.last()))
            {
                // Kills from a claim's lifetime before the first POST up to the last.
                let from = first.saturating_sub(cluster.config.claim_ttl());
                let kills: Vec<String> = cluster
                    .kills
                    .iter()
                    .filter(|k| k.at >= from && k.at <= *last + Duration::from_secs(1))
                    .map(|k| format!("{:.2}s {}", k.at.as_secs_f64(), k.what))
                    .collect();
                println!("   kills around it: {kills:?}");
            }
            for line in cluster.grep(id) {
                println!("   {line}");
            }
        }
    }
    drop(client);
    panic!("the kill test (seed {seed}) found:\n- {}", failures.join("\n- "));
}

/// `CHAOS_SEED` if given, else [`fresh_seed`].
fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => s.trim().parse().expect("CHAOS_SEED is a whole number"),
        Err(_) => fresh_seed(),
    }
}

/// A seed from the clock and the process id.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    mix(nanos as u64 ^ (u64::from(std::process::id()) << 32)) % 1_000_000_000
}

/// SplitMix64's output function: a well-spread 64-bit value for each input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic random number generator (SplitMix64), so a seed replays a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

// ---- the receiver ----

struct ReceiverState {
    t0: Instant,
    seed: u64,
    count: AtomicU64,
    /// Every POST, by its `Idempotency-Key`: when it arrived (since the test started).
    got: Mutex<HashMap<String, Vec<Duration>>>,
    /// The notification ids received for each request's `Idempotency-Key` (which the load puts
    /// in the notification's metadata as `request_key`).
    by_request: Mutex<HashMap<String, HashSet<String>>>,
    /// POSTs whose `Idempotency-Key` is not the body's notification id.
    malformed: Mutex<Vec<String>>,
}

/// A webhook receiver on a real HTTP server that records every POST and answers 200 after
/// 0–30 ms.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[handler]
async fn hook(req: &Request, body: Vec<u8>, state: Data<&Arc<ReceiverState>>) -> StatusCode {
    let at = state.t0.elapsed();
    let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let id = serde_json::from_slice::<Value>(&body).ok().and_then(|b| b["id"].as_str().map(str::to_owned));
    let request = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b["metadata"]["request_key"].as_str().map(str::to_owned));
    if id.as_deref() != Some(key.as_str()) || request.is_none() {
        state
            .malformed
            .lock()
            .unwrap()
            .push(format!("Idempotency-Key {key:?} on a body with id {id:?} and request_key {request:?}"));
    }
    if let Some(request) = request {
        state.by_request.lock().unwrap().entry(request).or_default().insert(key.clone());
    }
    state.got.lock().unwrap().entry(key).or_default().push(at);
    let n = state.count.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(mix(state.seed ^ n.rotate_left(17)) % 31)).await;
    StatusCode::OK
}

impl Receiver {
    async fn start(seed: u64, t0: Instant) -> Receiver {
        let state = Arc::new(ReceiverState {
            t0,
            seed,
            count: AtomicU64::new(0),
            got: Mutex::new(HashMap::new()),
            by_request: Mutex::new(HashMap::new()),
            malformed: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Route::new().at("/hook", post(hook)).data(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async {
                        let _ = rx.await;
                    },
                    Some(Duration::from_millis(10)),
                )
                .await;
        });
        Receiver { url, state, _stop: tx }
    }
}

// ---- the processes ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nats,
    Gateway,
    Worker,
}

/// One SIGKILL: when (since the test started), of what, and which process.
struct Kill {
    at: Duration,
    kind: Kind,
    what: String,
}

/// A `herald gateway` or `herald worker` child process (its output is in the cluster's directory).
struct Proc {
    name: String,
    child: Child,
}

/// nats-server, the gateway and the workers, as child processes of the test.
struct Cluster {
    t0: Instant,
    dir: PathBuf,
    /// The environment of every herald process.
    env: Vec<(&'static str, String)>,
    /// The same settings, for this test's own NATS client and ledger.
    config: Config,
    base: String,
    nats: Option<NatsServer>,
    gateway: Option<Proc>,
    worker: Option<Proc>,
    second: Option<Proc>,
    second_runs: usize,
    started: usize,
    logs: Vec<PathBuf>,
    /// What happened when, for the report.
    events: Vec<String>,
    kills: Vec<Kill>,
    /// Processes that exited without being killed.
    exits: Vec<String>,
    /// Whether the kill log was printed with the counts (else a panic prints it).
    reported: bool,
    /// Last: removed after the processes are gone (kept if the test fails).
    temp: Option<tempfile::TempDir>,
}

/// A port for a server that is restarted on it: below the kernel's ephemeral range, so no
/// client connection (of this test or another running beside it) takes it while it is down.
fn restartable_port(rng: &mut Rng) -> u16 {
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        for _ in 0..200 {
            let port = 10_000 + rng.below(u64::from(low - 10_000)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    herald_shared::nats_server::free_port()
}

impl Cluster {
    /// Starts nats-server, the gateway and one worker, and waits for the gateway to be ready.
    async fn start(uncertain: &str, t0: Instant) -> Cluster {
        let temp = tempfile::Builder::new().prefix("herald-chaos-").tempdir().unwrap();
        let dir = temp.path().to_owned();
        // Not from the run's seed: two runs side by side (or a replay beside another) must not
        // try the same ports.
        let mut rng = Rng(fresh_seed());
        let nats_port = restartable_port(&mut rng);
        let http_port = restartable_port(&mut rng);
        let store = dir.join("nats");
        let nats = tokio::task::spawn_blocking(move || {
            NatsServer::start(
                &Locator::from_env(),
                ServerOptions { port: Some(nats_port), store_dir: Some(store) },
            )
        })
        .await
        .unwrap()
        .expect("starting nats-server");
        let env: Vec<(&'static str, String)> = vec![
            (config::NATS_URL, nats.url()),
            (config::HTTP_ADDR, format!("127.0.0.1:{http_port}")),
            (config::JWT_SECRET, JWT_SECRET.into()),
            (config::WEBHOOK_SECRET, WEBHOOK_SECRET.into()),
            (config::WEBHOOK_ALLOW_PRIVATE, "true".into()),
            (config::DATA_DIR, dir.join("data").display().to_string()),
            (config::UNCERTAIN, uncertain.into()),
            (config::NATS_TIMEOUT, "1s".into()),
            (config::SEND_TIMEOUT, "2s".into()),
            (config::RETRY_BACKOFF, "100ms,200ms,500ms".into()),
            (config::MAX_ATTEMPTS, "8".into()),
        ];
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = Config::from_pairs(&pairs).unwrap();
        let mut cluster = Cluster {
            t0,
            dir,
            env,
            config,
            base: format!("http://127.0.0.1:{http_port}"),
            nats: Some(nats),
            gateway: None,
            worker: None,
            second: None,
            second_runs: 0,
            started: 0,
            logs: Vec::new(),
            events: Vec::new(),
            kills: Vec::new(),
            exits: Vec::new(),
            reported: false,
            temp: Some(temp),
        };
        cluster.note(format!("started nats-server on port {nats_port}; logs in {}", cluster.dir.display()));
        cluster.gateway = Some(cluster.spawn("gateway"));
        cluster.worker = Some(cluster.spawn("worker"));
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
        let ready = format!("{}/ready", cluster.base);
        eventually(Duration::from_secs(60), "the gateway to be ready", || async {
            let r = http.get(&ready).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        cluster.note("gateway ready; load starts");
        cluster
    }

    fn note(&mut self, what: impl std::fmt::Display) {
        let line = format!("{:>7.2}s {what}", self.t0.elapsed().as_secs_f64());
        self.events.push(line);
    }

    /// Starts `herald <role>` with the cluster's environment and only that (no inherited
    /// `HERALD_*` or `RUST_LOG`), its output in `<n>-<role>-<pid>.log`.
    fn spawn(&mut self, role: &'static str) -> Proc {
        self.started += 1;
        let log = self.dir.join(format!("{:02}-{role}.log", self.started));
        let file = File::create(&log).unwrap();
        let mut command = Command::new(HERALD);
        command.arg(role);
        for var in config::VARS {
            command.env_remove(var.name);
        }
        command.env_remove("RUST_LOG");
        // Plain text logs, for reading and grepping.
        command.env("NO_COLOR", "1");
        command.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        command.stdin(Stdio::null()).stdout(Stdio::from(file.try_clone().unwrap())).stderr(Stdio::from(file));
        let child = command.spawn().unwrap();
        let pid = child.id();
        let named = self.dir.join(format!("{:02}-{role}-{pid}.log", self.started));
        fs::rename(&log, &named).unwrap();
        self.logs.push(named);
        let name = format!("{role} pid {pid}");
        self.note(format!("started {name}"));
        Proc { name, child }
    }

    fn kill(&mut self, mut proc: Proc, kind: Kind) {
        let _ = proc.child.kill();
        let status = proc.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        self.kills.push(Kill { at: self.t0.elapsed(), kind, what: proc.name.clone() });
        self.note(format!("SIGKILL {} ({status})", proc.name));
    }

    async fn kill_nats(&mut self, down: Duration) {
        let mut nats = self.nats.take().expect("nats-server runs");
        nats.stop();
        self.kills.push(Kill { at: self.t0.elapsed(), kind: Kind::Nats, what: "nats-server".into() });
        self.note("SIGKILL nats-server");
        tokio::time::sleep(down).await;
        let (nats, restarted) = tokio::task::spawn_blocking(move || {
            let r = nats.restart();
            (nats, r)
        })
        .await
        .unwrap();
        self.nats = Some(nats);
        restarted.expect("restarting nats-server");
        self.note("restarted nats-server");
    }

    /// Kills and restarts processes at random moments until `load_for` has passed and each kind
    /// was killed at least [`MIN_KILLS`] times. The targets come in shuffled rounds of four:
    /// nats-server, gateway, worker, and the second worker (started if it is not running,
    /// killed if it is).
    async fn rampage(&mut self, rng: &mut Rng, load_for: Duration) {
        let start = Instant::now();
        let mut round: Vec<u8> = Vec::new();
        let count = |c: &Cluster, kind| c.kills.iter().filter(|k| k.kind == kind).count();
        loop {
            let enough =
                [Kind::Nats, Kind::Gateway, Kind::Worker].into_iter().all(|k| count(self, k) >= MIN_KILLS);
            if enough && start.elapsed() >= load_for {
                return;
            }
            tokio::time::sleep(rng.millis(1500, 4000)).await;
            self.check_exits();
            if round.is_empty() {
                round = vec![0, 1, 2, 3];
                for i in (1..round.len()).rev() {
                    round.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let down = rng.millis(0, 800);
            match round.pop().unwrap() {
                0 => self.kill_nats(down).await,
                1 => {
                    let gateway = self.gateway.take().expect("the gateway runs");
                    self.kill(gateway, Kind::Gateway);
                    tokio::time::sleep(down).await;
                    self.gateway = Some(self.spawn("gateway"));
                }
                2 => {
                    let worker = self.worker.take().expect("the worker runs");
                    self.kill(worker, Kind::Worker);
                    tokio::time::sleep(down).await;
                    self.worker = Some(self.spawn("worker"));
                }
                _ => match self.second.take() {
                    Some(second) => self.kill(second, Kind::Worker),
                    None => {
                        let mut second = self.spawn("worker");
                        second.name = format!("second {}", second.name);
                        self.second = Some(second);
                        self.second_runs += 1;
                    }
                },
            }
        }
    }

    /// Notes processes that exited without being killed and starts the gateway or worker again.
    fn check_exits(&mut self) {
        fn exited(slot: &mut Option<Proc>) -> Option<(Proc, String)> {
            let status = slot.as_mut()?.child.try_wait().ok()??;
            Some((slot.take()?, status.to_string()))
        }
        if let Some((p, status)) = exited(&mut self.gateway) {
            self.exits.push(format!("{} ({status})", p.name));
            self.note(format!("{} exited on its own ({status}); starting it again", p.name));
            self.gateway = Some(self.spawn("gateway"));
        }
        if let Some((p, status)) = exited(&mut self.worker) {
            self.exits.push(format!("{} ({status})", p.name));
            self.note(format!("{} exited on its own ({status}); starting it again", p.name));
            self.worker = Some(self.spawn("worker"));
        }
        if let Some((p, status)) = exited(&mut self.second) {
            self.exits.push(format!("{} ({status})", p.name));
            self.note(format!("{} exited on its own ({status})", p.name));
        }
    }

    /// Every line of every process log that mentions `needle`, prefixed with the log's name.
    fn grep(&self, needle: &str) -> Vec<String> {
        let mut out = Vec::new();
        for path in &self.logs {
            let text = fs::read_to_string(path).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(needle)) {
                out.push(format!("{}: {line}", file_name(path)));
            }
        }
        out
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for slot in [&mut self.gateway, &mut self.worker, &mut self.second] {
            if let Some(mut p) = slot.take() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if std::thread::panicking() {
            if !self.reported {
                println!("---- kill log ----");
                for event in &self.events {
                    println!("  {event}");
                }
            }
            for path in &self.logs {
                let text = fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                println!("---- last lines of {} ----", file_name(path));
                for line in &lines[lines.len().saturating_sub(25)..] {
                    println!("{line}");
                }
            }
            if let Some(temp) = self.temp.take() {
                println!("---- logs and nats-server store kept in {} ----", temp.keep().display());
            }
        }
    }
}

// ---- the load ----

/// The requests of a run and what became of them.
struct Load {
    url: String,
    token: String,
    /// The request body, without the metadata naming the request.
    body: Value,
    seed: u64,
    http: reqwest::Client,
    sent: AtomicUsize,
    tries: AtomicUsize,
    duplicates: AtomicUsize,
    /// Idempotency-Key → notification id, for each request answered 202.
    accepted: Mutex<HashMap<String, String>>,
    /// Set when the load ends: requests still without a 202 after this give up.
    give_up_at: Mutex<Option<Instant>>,
    given_up: Mutex<Vec<String>>,
    /// Requests answered with something other than 202, 503 or a connection error.
    refused: Mutex<Vec<String>>,
}

impl Load {
    fn new(cluster: &Cluster, receiver_url: &str, seed: u64) -> Load {
        Load {
            url: format!("{}/v1/notifications", cluster.base),
            token: auth::mint(
                JWT_SECRET,
                "tests",
                Some(TENANT),
                auth::DEFAULT_SCOPES,
                Duration::from_secs(3600),
            ),
            body: webhook_body(receiver_url),
            seed,
            http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap(),
            sent: AtomicUsize::new(0),
            tries: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            accepted: Mutex::new(HashMap::new()),
            give_up_at: Mutex::new(None),
            given_up: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        }
    }

    /// Posts one notification under `key` until it is answered 202, retrying connection
    /// errors, timeouts and 503s with the same key.
    async fn request(self: Arc<Self>, key: String) {
        let mut body = self.body.clone();
        body["metadata"]["request_key"] = Value::String(key.clone());
        let body = body.to_string();
        for attempt in 0u64.. {
            self.tries.fetch_add(1, SeqCst);
            let answer = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", &key)
                .body(body.clone())
                .send()
                .await;
            let why = match answer {
                Ok(r) if r.status().as_u16() == 202 => match r.json::<Value>().await {
                    Ok(body) => {
                        let id = body["id"].as_str().expect("a 202 names the notification").to_owned();
                        if body["duplicate"] == true {
                            self.duplicates.fetch_add(1, SeqCst);
                        }
                        self.accepted.lock().unwrap().insert(key, id);
                        return;
                    }
                    Err(e) => format!("reading the 202: {e}"),
                },
                Ok(r) if r.status().as_u16() == 503 => "503".to_owned(),
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    self.refused.lock().unwrap().push(format!("{key}: {status} {text}"));
                    return;
                }
                Err(e) => e.to_string(),
            };
            if self.give_up_at.lock().unwrap().is_some_and(|at| Instant::now() >= at) {
                self.given_up.lock().unwrap().push(format!("{key}: {why}"));
                return;
            }
            let pause = 100 + mix(self.seed ^ attempt ^ mix(key.len() as u64 + attempt)) % 200;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

/// Starts [`RATE`] requests a second until `stop`; returns the requests, still running.
async fn drive(load: Arc<Load>, stop: Arc<AtomicBool>) -> JoinSet<()> {
    let mut requests = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(SeqCst) {
        tick.tick().await;
        let n = load.sent.fetch_add(1, SeqCst) + 1;
        let key = format!("chaos-{}-{n:06}", load.seed);
        requests.spawn(load.clone().request(key));
    }
    requests
}

// ---- the outcome ----

/// What the ledger and HERALD_DLQ say of the accepted notifications.
struct Outcome {
    /// The webhook status of each notification, as last read.
    status: HashMap<String, Status>,
    /// The `Herald-Dlq-Reason` of each letter in HERALD_DLQ, by the intent's notification id.
    letters: HashMap<String, Vec<String>>,
    /// Dead-lettered in the ledger, with no letter in HERALD_DLQ.
    unparked: Vec<String>,
}

/// Reads HERALD_DLQ from `next` on, adding each letter's reason to `letters`.
async fn read_letters(js: &jetstream::Context, next: &mut u64, letters: &mut HashMap<String, Vec<String>>) {
    let Ok(mut stream) = js.get_stream(DLQ_STREAM).await else { return };
    let Ok(info) = stream.info().await else { return };
    let last = info.state.last_sequence;
    while *next <= last {
        match stream.get_raw_message(*next).await {
            Ok(m) => {
                let reason = m.headers.get(dlq::REASON).map(|v| v.as_str().to_owned()).unwrap_or_default();
                let id = Intent::from_message(&m.payload, Some(&m.headers), Channel::Webhook, None)
                    .map(|i| i.id)
                    .unwrap_or_else(|e| format!("<undecodable letter {}: {e}>", *next));
                if !reason.is_empty() {
                    letters.entry(id).or_default().push(reason);
                }
            }
            Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => {}
            Err(e) => match e.kind() {
                RawMessageErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND => {}
                // NATS unreachable for a moment: read it next time.
                _ => return,
            },
        }
        *next += 1;
    }
}

/// Polls the ledger until every notification in `ids` is delivered, or dead-lettered with its
/// letter in HERALD_DLQ, or `deadline` passes; then reads every one once more.
async fn settle(ledger: &Ledger, js: &jetstream::Context, ids: &[String], deadline: Instant) -> Outcome {
    let mut status = HashMap::new();
    let mut letters = HashMap::new();
    let mut next_letter = 1;
    let mut pending: Vec<String> = ids.to_vec();
    loop {
        read_letters(js, &mut next_letter, &mut letters).await;
        let reads: Vec<(String, Option<Status>)> = futures::stream::iter(pending.drain(..))
            .map(|id| async move {
                let record = ledger.record(Some(TENANT), &id).await;
                let s =
                    record.ok().flatten().and_then(|r| r.channels.get(&Channel::Webhook).map(|c| c.status));
                (id, s)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (id, s) in reads {
            let done = match s {
                Some(Status::Delivered) => true,
                Some(Status::DeadLettered) => letters.contains_key(&id),
                _ => false,
            };
            if let Some(s) = s {
                status.insert(id.clone(), s);
            }
            if !done {
                pending.push(id);
            }
        }
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Once more, all of them: a late write may have changed an outcome read earlier.
    read_letters(js, &mut next_letter, &mut letters).await;
    let reads: Vec<(String, Option<Entry>)> = futures::stream::iter(ids.iter().cloned())
        .map(|id| async move {
            let key = LedgerKey::new(Some(TENANT), &id, Channel::Webhook);
            // A read that fails leaves what the last one said.
            for _ in 0..20 {
                if let Ok((entry, _)) = ledger.read(&key).await {
                    return (id, entry);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            panic!("cannot read the ledger entry of {id}");
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (id, entry) in reads {
        match entry {
            Some(e) => status.insert(id, e.status),
            None => status.remove(&id),
        };
    }
    let unparked = ids
        .iter()
        .filter(|id| status.get(*id) == Some(&Status::DeadLettered) && !letters.contains_key(*id))
        .cloned()
        .collect();
    Outcome { status, letters, unparked }
}
