//! The test harness: [`Stack`] (nats-server + gateway + workers) and [`Sink`] (a webhook
//! receiver that checks every request against Herald's documented format).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, message::StreamMessage};
use herald_shared::{
    Config, auth, config,
    nats_server::NatsServer,
    topology::{self, DLQ_STREAM},
};
use hmac::{Hmac, Mac};
use poem::{
    EndpointExt, Request, Response, Route, handler, http::StatusCode, listener::TcpAcceptor, post, web::Data,
};
use serde_json::Value;
use sha2::Sha256;
use tokio::{sync::watch, task::JoinHandle};

pub const WEBHOOK_SECRET: &str = "test-webhook-secret";
/// The tenant of the tests' token, and of their direct publishes.
pub const TENANT: &str = "acme";

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway at `base` (a child process) answers `/ready` with 200.
pub async fn wait_ready(base: &str) {
    let http = http_client();
    eventually(Duration::from_secs(30), &format!("the gateway at {base} to be ready"), || {
        let (http, url) = (http.clone(), format!("{base}/ready"));
        async move { http.get(url).send().await.ok()?.status().is_success().then_some(()) }
    })
    .await;
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

/// nats-server (one, or a cluster), gateway and workers, all real, on ephemeral ports.
pub struct Stack<N = NatsServer> {
    pub base: String,
    pub config: Config,
    pub js: jetstream::Context,
    pub http: reqwest::Client,
    pub token: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// `HERALD_DATA_DIR` of this stack (local copies), unless the test named one.
    _data_dir: Option<tempfile::TempDir>,
    /// Last field: dropped last, and prints its log if the test panicked.
    pub nats: N,
}

impl Stack {
    /// Millisecond backoffs, three attempts, short webhook timeout.
    pub async fn start() -> Stack {
        Stack::start_with(&[]).await
    }

    pub async fn start_with(pairs: &[(&str, &str)]) -> Stack {
        let nats = tokio::task::spawn_blocking(NatsServer::for_test).await.unwrap();
        let url = nats.url();
        Stack::on(nats, &url, pairs).await
    }
}

impl<N> Stack<N> {
    /// Gateway and workers against `nats`, reached at `url` (a comma-separated list for a
    /// cluster), with the tests' defaults overridden by `pairs`.
    pub async fn on(nats: N, url: &str, pairs: &[(&str, &str)]) -> Stack<N> {
        let mut all = vec![
            (config::NATS_URL, url),
            (config::RETRY_BACKOFF, "50ms,100ms"),
            (config::MAX_ATTEMPTS, "3"),
            (config::SEND_TIMEOUT, "300ms"),
            (config::NATS_TIMEOUT, "1s"),
            (config::MAX_BODY_BYTES, "16384"),
            (config::WEBHOOK_SECRET, WEBHOOK_SECRET),
            // The test receivers listen on 127.0.0.1.
            (config::WEBHOOK_ALLOW_PRIVATE, "true"),
        ];
        // Each stack keeps its local copies apart from other tests' (and their nats-servers').
        let data_dir =
            (!pairs.iter().any(|(k, _)| *k == config::DATA_DIR)).then(|| tempfile::tempdir().unwrap());
        let data_path = data_dir.as_ref().map(|d| d.path().to_str().unwrap().to_owned());
        if let Some(path) = &data_path {
            all.push((config::DATA_DIR, path));
        }
        all.retain(|(k, _)| !pairs.iter().any(|(p, _)| p == k));
        all.extend_from_slice(pairs);
        let config = Config::from_pairs(&all).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let gateway = herald_gateway::Gateway::connect(config.clone()).await.unwrap();
        gateway.ready().await;
        let provider_metrics = Arc::new(herald_workers::metrics::WorkerMetrics::default());
        let shown = provider_metrics.clone();
        gateway.show_metrics(move || shown.render());
        let (_client, js) = topology::connect(&config, "test-worker").await.unwrap();
        let topo = topology::ensure(&js, &config).await.unwrap();
        let tasks = vec![
            tokio::spawn(gateway.serve(listener, stopped(stop_rx.clone()))),
            tokio::spawn(herald_workers::run(
                config.clone(),
                topo,
                provider_metrics,
                stopped(stop_rx.clone()),
            )),
        ];
        let token = auth::mint(
            &config.jwt_secret,
            "tests",
            Some(TENANT),
            auth::DEFAULT_SCOPES,
            Duration::from_secs(600),
        );
        Stack { base, config, js, http: http_client(), token, stop, tasks, _data_dir: data_dir, nats }
    }

    /// Stops the gateway and workers gracefully and waits for them.
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.await.unwrap().unwrap();
        }
    }

    pub async fn post_raw(&self, body: &str, key: Option<&str>, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/notifications", self.base))
            .header("Content-Type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn post(&self, body: Value, key: Option<&str>) -> (StatusCode, Value) {
        self.post_raw(&body.to_string(), key, Some(&self.token)).await
    }

    /// Posts and expects 202; returns the notification id.
    pub async fn send(&self, body: Value, key: Option<&str>) -> String {
        let (status, answer) = self.post(body, key).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        answer["id"].as_str().unwrap().to_owned()
    }

    pub async fn get(&self, id: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}/v1/notifications/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.json().await.unwrap())
    }

    /// Waits until every local copy of `bucket` this stack's processes follow has applied the
    /// bucket's latest change (a worker renders only from its copies).
    pub async fn wait_copies(&self, bucket: &str) {
        let dir = self.config.data_dir.clone();
        let stream = format!("KV_{bucket}");
        eventually(Duration::from_secs(15), &format!("the copies of {bucket} to catch up"), || async {
            let last = self.js.get_stream(&stream).await.ok()?.info().await.ok()?.state.last_sequence;
            let copies: Vec<_> = herald_shared::mirror::following_in(&dir)
                .into_iter()
                .filter(|(name, _)| name.starts_with(bucket.trim_start_matches("herald_")))
                .collect();
            (!copies.is_empty() && copies.iter().all(|(_, s)| s.applied >= last)).then_some(())
        })
        .await;
    }

    /// The gateway's `/metrics` page (in these stacks, with the workers' provider metrics).
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap();
        assert!(resp.status().is_success());
        resp.text().await.unwrap()
    }

    /// Waits until the notification's overall status is `status`.
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        eventually(Duration::from_secs(15), &format!("{id} to be {status}"), || async {
            let (code, body) = self.get(id).await;
            (code == StatusCode::OK && body["status"] == status).then_some(body)
        })
        .await
    }

    /// Waits until the channel's consumer has nothing pending, delivered or waiting: every
    /// message so far was acknowledged or terminated, so nothing more will be sent for them.
    pub async fn wait_settled(&self) {
        use futures::TryStreamExt;
        let intents = self.js.get_stream(herald_shared::topology::INTENTS_STREAM).await.unwrap();
        eventually(Duration::from_secs(15), "every message to be settled", || async {
            let mut stream = intents.clone();
            let last = stream.info().await.ok()?.state.last_sequence;
            // Every channel's consumers (a notification by user may go on several channels):
            // nothing waiting, nothing unacknowledged, and one of them has acknowledged the last.
            let consumers: Vec<jetstream::consumer::Info> = intents.consumers().try_collect().await.ok()?;
            let quiet = consumers.iter().all(|c| c.num_pending == 0 && c.num_ack_pending == 0);
            let floor = consumers.iter().map(|c| c.ack_floor.stream_sequence).max().unwrap_or(0);
            (quiet && floor >= last).then_some(())
        })
        .await;
    }

    /// Every message in HERALD_DLQ.
    pub async fn dead_letters(&self) -> Vec<StreamMessage> {
        let mut stream = self.js.get_stream(DLQ_STREAM).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(m);
            }
        }
        out
    }

    pub async fn wait_dead_letters(&self, n: usize) -> Vec<StreamMessage> {
        eventually(Duration::from_secs(15), &format!("{n} dead letters"), || async {
            let dl = self.dead_letters().await;
            (dl.len() >= n).then_some(dl)
        })
        .await
    }

    /// The ledger, straight from the bucket (works with the gateway stopped).
    pub async fn ledger(&self) -> herald_shared::ledger::Ledger {
        let kv = self.js.get_key_value(herald_shared::topology::NOTIFICATIONS_BUCKET).await.unwrap();
        herald_shared::ledger::Ledger::new(self.js.clone(), kv, self.config.claim_ttl())
    }

    /// The notification's record of tenant `acme` (the tests' token) straight from the bucket.
    pub async fn record(&self, id: &str) -> Option<herald_shared::NotificationRecord> {
        self.ledger().await.record(Some(TENANT), id).await.unwrap()
    }

    /// Every status event so far, as (subject, event).
    pub async fn status_events(&self) -> Vec<(String, Value)> {
        let mut stream = self.js.get_stream(herald_shared::topology::STATUS_STREAM).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.unwrap();
            out.push((m.subject.to_string(), serde_json::from_slice(&m.payload).unwrap()));
        }
        out
    }

    /// Publishes straight to JetStream, as a `nats pub` user would, for the tests' tenant.
    pub async fn publish_intent(
        &self,
        payload: Vec<u8>,
        msg_id: Option<&str>,
        content_type: Option<&str>,
    ) -> bool {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(herald_shared::intent::headers::TENANT, TENANT);
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        if let Some(ct) = content_type {
            headers.insert("Content-Type", ct);
        }
        let ack = self
            .js
            .publish_with_headers("herald.intent.webhook", headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
        ack.duplicate
    }
}

pub fn header(m: &StreamMessage, name: &str) -> String {
    m.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default()
}

/// How the sink answers one request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    TooManyRequests(u64),
    /// Never answers (the worker's timeout fires).
    Hang,
    /// Answers 200 after this many milliseconds.
    Slow(u64),
    /// Holds the request until [`Sink::open`] is called, then answers 200.
    Held,
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Value,
    pub headers: Vec<(String, String)>,
    /// What was wrong with the request, measured against the documented format.
    pub problems: Vec<String>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

struct SinkState {
    script: Mutex<VecDeque<Reply>>,
    otherwise: Reply,
    received: Mutex<Vec<Received>>,
    /// Requests being answered right now, and the most there ever were at once.
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    /// Turns true when held requests may be answered.
    open: watch::Sender<bool>,
}

/// A webhook receiver on a real HTTP server.
pub struct Sink {
    pub url: String,
    state: Arc<SinkState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Checks a delivery exactly as README's "Receiving webhooks" documents it: a JSON POST whose
/// `Herald-Signature` is `t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<body>")>`, with matching
/// `Herald-Timestamp`, and `Idempotency-Key` / `Herald-Notification-Id` equal to the body's id.
/// The HMAC is computed here independently of Herald's own signing code.
fn check_request(req: &Request, body: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if req.method() != "POST" {
        problems.push(format!("method {}", req.method()));
    }
    if !h("content-type").is_some_and(|c| c.starts_with("application/json")) {
        problems.push("content-type is not application/json".into());
    }
    let json: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            problems.push(format!("body is not JSON: {e}"));
            return problems;
        }
    };
    for field in ["id", "channel", "data", "metadata", "created_at"] {
        if json.get(field).is_none() {
            problems.push(format!("body lacks `{field}`"));
        }
    }
    let id = json["id"].as_str().unwrap_or_default();
    if h("idempotency-key").as_deref() != Some(id) {
        problems.push("Idempotency-Key is not the notification id".into());
    }
    if h("herald-notification-id").as_deref() != Some(id) {
        problems.push("Herald-Notification-Id is not the notification id".into());
    }
    let sig = h("herald-signature").unwrap_or_default();
    let ts = h("herald-timestamp").unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()));
    if sig != expected {
        problems.push(format!("signature {sig:?} is not {expected:?}"));
    }
    let now = chrono::Utc::now().timestamp();
    if ts.parse::<i64>().map_or(true, |t| (now - t).abs() > 300) {
        problems.push(format!("timestamp {ts:?} is not current"));
    }
    problems
}

#[handler]
async fn receive(req: &Request, body: Vec<u8>, state: Data<&Arc<SinkState>>) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let now = state.in_flight.fetch_add(1, SeqCst) + 1;
    state.max_in_flight.fetch_max(now, SeqCst);
    let response = answer(req, body, &state).await;
    state.in_flight.fetch_sub(1, SeqCst);
    response
}

async fn answer(req: &Request, body: Vec<u8>, state: &SinkState) -> Response {
    let problems = check_request(req, &body);
    let reply = state.script.lock().unwrap().pop_front().unwrap_or(state.otherwise);
    state.received.lock().unwrap().push(Received {
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        problems,
        at: Instant::now(),
    });
    match reply {
        Reply::Status(code) => {
            Response::builder().status(StatusCode::from_u16(code).unwrap()).body("sink says so")
        }
        Reply::TooManyRequests(secs) => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("Retry-After", secs.to_string())
            .body("slow down"),
        Reply::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::builder().status(StatusCode::OK).finish()
        }
        Reply::Held => {
            let _ = state.open.subscribe().wait_for(|open| *open).await;
            Response::builder().status(StatusCode::OK).finish()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::builder().status(StatusCode::OK).finish()
        }
    }
}

impl Sink {
    /// Answers with `script` in order, then `otherwise` forever.
    pub async fn start(script: Vec<Reply>, otherwise: Reply) -> Sink {
        let state = Arc::new(SinkState {
            script: Mutex::new(script.into()),
            otherwise,
            received: Mutex::new(Vec::new()),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            open: watch::channel(false).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Route::new().at("/hook", post(receive)).data(state.clone());
        let tx = crate::support::serve(listener, app);
        Sink { url, state, _stop: tx }
    }

    pub async fn ok() -> Sink {
        Sink::start(vec![], Reply::Status(200)).await
    }

    /// Answers every held request, and those that come later.
    pub fn open(&self) {
        self.state.open.send_replace(true);
    }

    /// Requests being answered right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests the sink was ever answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits for `n` requests, then checks every request so far was well-formed.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let got = eventually(Duration::from_secs(15), &format!("{n} webhook requests"), || async {
            let r = self.received();
            (r.len() >= n).then_some(r)
        })
        .await;
        for r in &got {
            assert!(r.problems.is_empty(), "malformed delivery: {:?}", r.problems);
        }
        got
    }
}

/// The value of the series `series` (name and labels exactly as exposed, e.g.
/// `herald_provider_calls_total{channel="webhook",provider="webhook"}`) in a Prometheus page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Serves `app` on `listener` (a stand-in for a receiver or a provider) until the returned
/// sender is dropped.
pub fn serve(
    listener: tokio::net::TcpListener,
    app: impl poem::Endpoint + 'static,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app.map_to_response(),
                async {
                    let _ = rx.await;
                },
                Some(Duration::from_millis(10)),
            )
            .await;
    });
    tx
}

/// A request body for one webhook notification to `url`.
pub fn webhook_body(url: &str) -> Value {
    serde_json::json!({
        "recipient": {"webhook_url": url},
        "content": {"title": "Shipped", "body": "Order 42 is on its way"},
        "data": {"order": 42},
        "metadata": {"source": "tests"}
    })
}
