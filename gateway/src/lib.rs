//! Herald's HTTP gateway.
//!
//! - [`api`]: the poem-openapi operations, one struct per resource.
//! - [`accept`]: the accept path, storing intents in JetStream with idempotency.
//! - [`errors`]: every error's HTTP form, in one place.
//! - [`payload`]: `StrictJson`, request bodies whose errors name the field.
//! - [`auth`]: the bearer-token security scheme.
//! - [`metrics`]: Prometheus counters served on `/metrics`.
//!
//! [`Gateway::serve`] runs the server on a listener until a shutdown future completes, so tests
//! drive the real thing on `127.0.0.1:0`. [`openapi_service`] builds the one OpenAPI service
//! used by the router, by `herald openapi` and by the test that checks `openapi.json`.

pub mod accept;
pub mod api;
pub mod auth;
pub mod errors;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod payload;

use std::{future::Future, sync::Arc};

use herald_shared::{
    Config,
    mirror::Mirror,
    topology::{self, Topology, USERS_BUCKET},
};
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, listener::TcpAcceptor};
use poem_openapi::OpenApiService;

use crate::{errors::ApiError, metrics::Metrics, payload::BodyLimit};

/// Everything a request handler needs, shared by all of them.
pub struct AppState {
    pub config: Config,
    /// The NATS client, for its connection state.
    pub client: async_nats::Client,
    /// Set once the streams and bucket are ensured. The gateway serves from the start (so
    /// `/health` answers and requests get a quick 503) even when NATS is not reachable yet.
    topology: tokio::sync::OnceCell<Topology>,
    pub metrics: Metrics,
    /// Why new notifications are refused for want of room, if they are: HERALD_INTENTS near its
    /// limit with a message still needed close to being pushed out (checked four times a
    /// second), or a ledger write
    /// refused as full (cleared by the next one that lands). `/ready` reports it.
    storage: std::sync::Mutex<Storage>,
    /// Why the topology cannot be used, if it cannot (a replica mismatch): `/ready` says it.
    topology_error: std::sync::OnceLock<String>,
    /// Renders template previews; keeps the parts it compiled.
    pub(crate) renderer: herald_shared::templates::Renderer,
    /// Bulk dead-letter jobs started here, for `GET /v1/dlq/jobs/{job}`.
    pub(crate) dlq_jobs: api::Jobs,
    /// The local copy of `herald_users`, which `GET /v1/users` lists from (single-user reads go
    /// to the bucket, so a caller sees its own write at once).
    pub users_copy: Arc<Mirror>,
    /// Sending rates per tenant and token.
    pub(crate) rate_limits: limits::RateLimits,
    /// Connected inbox live streams, fed by one reader of every inbox change.
    pub(crate) live: Arc<live::Hub>,
    /// Other parts of this process whose metrics `/metrics` shows after the gateway's.
    pub more_metrics: std::sync::Mutex<Vec<Box<dyn Fn() -> String + Send + Sync>>>,
}

/// What the gateway knows about storage room.
#[derive(Debug, Default)]
pub(crate) struct Storage {
    pub intents_full: Option<String>,
    /// A ledger write refused as full, until one lands.
    pub bucket_full: Option<String>,
    /// How long idempotency keys are really kept, when their bucket is forgetting the oldest
    /// before the horizon.
    pub keys_kept: Option<std::time::Duration>,
}

impl AppState {
    /// The ensured topology, or 503 while NATS has not been reached yet.
    pub fn topology(&self) -> Result<&Topology, ApiError> {
        self.topology.get().ok_or_else(|| {
            ApiError::Unavailable("NATS has not been reached yet; Herald's streams are not ready".into())
        })
    }

    /// Why the topology cannot be used, if that is known.
    pub(crate) fn topology_error(&self) -> Option<&str> {
        self.topology_error.get().map(String::as_str)
    }

    /// Notes a bucket write refused as full (`Some(why)`), or one that landed (`None`).
    pub(crate) fn note_bucket_full(&self, full: Option<String>) {
        let mut storage = self.storage.lock().expect("never poisoned");
        if storage.bucket_full.is_some() || full.is_some() {
            storage.bucket_full = full;
        }
    }

    /// `work` within `rounds` NATS timeouts (an operation of several requests in a row gets
    /// several), or `503 unavailable`: a request never hangs on NATS.
    pub(crate) async fn within<T, E: Into<ApiError>>(
        &self,
        rounds: u32,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.config.nats_timeout * rounds, work).await {
            Ok(r) => r.map_err(Into::into),
            Err(_) => Err(ApiError::Unavailable("NATS did not answer in time".into())),
        }
    }

    /// Takes `cost` sends from the caller's tenant's and token's rates, or answers 429.
    pub(crate) fn rate_limit(&self, claims: &herald_shared::auth::Claims, cost: u64) -> Result<(), ApiError> {
        let tenant = claims.tenant_or_sub();
        // A token by what tells tokens apart without being secret.
        let token = format!("{}|{}|{}", claims.sub, claims.iat, claims.exp);
        self.rate_limits.take(tenant, &token, cost).map_err(ApiError::RateLimited)
    }

    /// How long idempotency keys are really kept, when that is less than the horizon.
    pub(crate) fn keys_kept(&self) -> Option<std::time::Duration> {
        self.storage.lock().expect("never poisoned").keys_kept
    }

    /// Why new notifications cannot be stored now, if they cannot.
    pub(crate) fn storage_full(&self) -> Option<String> {
        let storage = self.storage.lock().expect("never poisoned");
        storage.intents_full.clone().or_else(|| storage.bucket_full.clone())
    }
}

/// How often the gateway checks HERALD_INTENTS for room: what it accepts in between must fit
/// in the cushion [`topology::intents_full`] keeps before the oldest message still needed.
const STORAGE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Checks whether HERALD_INTENTS has room, until the gateway is gone.
async fn watch_storage(state: std::sync::Weak<AppState>) {
    let mut tick = tokio::time::interval(STORAGE_CHECK_EVERY);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let Ok(topology) = state.topology() else { continue };
        let check = async {
            Ok::<_, async_nats::Error>(match topology::intents_full(topology).await? {
                Some(full) => Some(full),
                None => topology::ledger_full(topology).await?,
            })
        };
        if let Ok(Ok(kept)) =
            tokio::time::timeout(state.config.nats_timeout, topology::keys_kept(topology)).await
        {
            let mut storage = state.storage.lock().expect("never poisoned");
            if kept.is_some() && storage.keys_kept.is_none() {
                tracing::warn!(
                    kept_s = kept.unwrap_or_default().as_secs(),
                    "the idempotency keys fill their share: the oldest are forgotten before HERALD_IDEMPOTENCY_HORIZON (raise HERALD_MAX_STORAGE)"
                );
            }
            storage.keys_kept = kept;
        }
        match tokio::time::timeout(state.config.nats_timeout, check).await {
            Ok(Ok(full)) => {
                let mut storage = state.storage.lock().expect("never poisoned");
                if full.is_some() && storage.intents_full.is_none() {
                    tracing::warn!(
                        reason = full.as_deref().unwrap_or_default(),
                        "storage full: refusing new notifications"
                    );
                }
                storage.intents_full = full;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot check HERALD_INTENTS and the ledger for room"),
            Err(_) => tracing::debug!("checking HERALD_INTENTS and the ledger for room timed out"),
        }
    }
}

/// The correlation id of the current request (from `X-Correlation-Id` or generated).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

pub const CORRELATION_HEADER: &str = "X-Correlation-Id";

/// The OpenAPI service: every operation, with the spec's metadata.
pub fn openapi_service() -> OpenApiService<
    (api::NotificationsApi, api::UsersApi, api::InboxApi, api::TemplatesApi, api::DlqApi, api::SystemApi),
    (),
> {
    OpenApiService::new(
        (api::NotificationsApi, api::UsersApi, api::InboxApi, api::TemplatesApi, api::DlqApi, api::SystemApi),
        "Herald",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Notification service on NATS JetStream. Send a notification with \
             `POST /v1/notifications`; follow it with `GET /v1/notifications/{id}`. \
             Authenticate with `Authorization: Bearer <JWT>` (HS256). Errors are JSON \
             `{code, message, field}`.",
    )
    .server("/")
}

/// The spec as committed in `openapi.json` and served at `/openapi.json`: poem-openapi's, with
/// every property that refers to a named schema written as a plain `$ref`. poem-openapi writes a
/// documented one as `allOf: [{$ref}, {description}]` (its issue 385), which client generators
/// refuse for enums ("Cannot take allOf a non-object"); the schema's own description stays.
pub fn openapi_json() -> String {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let mut spec: serde_json::Value =
            serde_json::from_str(&openapi_service().spec()).expect("poem-openapi writes JSON");
        plain_refs(&mut spec);
        serde_json::to_string_pretty(&spec).expect("a JSON value serializes") + "\n"
    })
    .clone()
}

/// Replaces every `{allOf: [{$ref: R}, …only descriptions and defaults…], …}` with `{$ref: R}`.
fn plain_refs(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let single_ref = map.get("allOf").and_then(Value::as_array).and_then(|parts| {
                let (first, rest) = parts.split_first()?;
                let reference = first.as_object().filter(|o| o.len() == 1)?.get("$ref")?.clone();
                let only_docs = rest.iter().all(|p| {
                    p.as_object().is_some_and(|o| o.keys().all(|k| k == "description" || k == "default"))
                });
                only_docs.then_some(reference)
            });
            if let Some(reference) = single_ref {
                map.clear();
                map.insert("$ref".into(), reference);
                return;
            }
            map.values_mut().for_each(plain_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(plain_refs),
        _ => {}
    }
}

/// The HTTP gateway.
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    /// Starts connecting to NATS and returns at once; the topology is ensured in the background
    /// (retried until NATS answers), and requests that need it answer 503 until then.
    pub async fn connect(config: Config) -> anyhow::Result<Gateway> {
        let (client, js) = topology::connect(&config, "herald-gateway").await?;
        // Opened before NATS answers: the copy serves what it holds from disk at once.
        let users_copy = Arc::new(Mirror::open(&config.data_dir, "users")?);
        let state = Arc::new(AppState {
            rate_limits: limits::RateLimits::new(&config),
            config,
            client,
            topology: tokio::sync::OnceCell::new(),
            metrics: Metrics::default(),
            storage: Default::default(),
            topology_error: Default::default(),
            dlq_jobs: Default::default(),
            renderer: Default::default(),
            users_copy: users_copy.clone(),
            more_metrics: Default::default(),
            live: Default::default(),
        });
        let background = state.clone();
        tokio::spawn(async move {
            match topology::ensure_with_retry(&js, &background.config).await {
                Ok(t) => {
                    tokio::spawn(users_copy.follow(t.js.clone(), USERS_BUCKET.to_owned()));
                    tokio::spawn(background.live.clone().run(t.inbox.clone()));
                    let _ = background.topology.set(t);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the JetStream topology");
                    let _ = background.topology_error.set(e.to_string());
                    return;
                }
            }
            watch_storage(Arc::downgrade(&background)).await;
        });
        Ok(Gateway { state })
    }

    /// Shows another part's metrics after the gateway's own on `/metrics` (`herald up`: the
    /// workers' provider metrics).
    pub fn show_metrics(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.state.more_metrics.lock().expect("never poisoned").push(Box::new(render));
    }

    /// Resolves once the topology is ensured (for `herald up` and tests, which want a ready
    /// gateway before they announce it).
    pub async fn ready(&self) {
        while self.state.topology.get().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The router with every route and middleware.
    pub fn app(&self) -> impl Endpoint + 'static {
        let service = openapi_service();
        let docs = service.swagger_ui();
        let state = self.state.clone();
        let cors = cors(&state.config.cors_origins);
        Route::new()
            .nest("/", service)
            .nest("/docs", docs)
            .at("/openapi.json", poem::get(spec_json))
            .at("/inbox", poem::get(inbox_page))
            .with_if(cors.is_some(), cors.unwrap_or_default())
            .data(BodyLimit { single: state.config.max_body_bytes, batch: state.config.max_batch_bytes })
            .around(limits::limit_in_flight)
            .around(correlate)
            .data(limits::InFlight(Arc::new(tokio::sync::Semaphore::new(state.config.max_in_flight))))
            .data(state)
            .catch_all_error(|err| async move { errors::into_json_response(err) })
    }

    /// Serves on `listener` until `shutdown` completes, then drains in-flight requests.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "gateway listening");
        let config = &self.state.config;
        raise_open_files(config.max_connections);
        let timeouts =
            limits::ReadTimeouts { header: config.header_read_timeout, body: config.body_read_timeout };
        let acceptor = limits::GuardedAcceptor::new(
            TcpAcceptor::from_tokio(listener)?,
            config.max_connections,
            timeouts,
        );
        let idle = config.idle_timeout;
        poem::Server::new_with_acceptor(acceptor)
            .idle_timeout(idle)
            .run_with_graceful_shutdown(self.app(), shutdown, Some(std::time::Duration::from_secs(10)))
            .await?;
        Ok(())
    }
}

/// Raises the soft limit on open files to the hard one, as a service manager's `LimitNOFILE`
/// would: a shell's usual 1,024 is below `HERALD_MAX_CONNECTIONS`, and a gateway that runs out
/// of descriptors leaves new connections waiting unanswered in the kernel's queue.
fn raise_open_files(max_connections: usize) {
    // A connection holds one descriptor; NATS, the data dir and the runtime need a few more.
    let wanted = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            max_connections,
            "the open-files limit is below HERALD_MAX_CONNECTIONS; raise `ulimit -n` or lower it"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "could not read or raise the open-files limit"),
    }
}

/// `HERALD_CORS_ORIGINS` as middleware: none when unset (browsers then refuse other origins'
/// calls), any origin for `*`.
fn cors(origins: &[String]) -> Option<poem::middleware::Cors> {
    use poem::http::Method;
    if origins.is_empty() {
        return None;
    }
    let cors = poem::middleware::Cors::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            "authorization",
            "content-type",
            "idempotency-key",
            "if-match",
            "last-event-id",
            "x-correlation-id",
        ])
        .expose_headers([
            "etag",
            "retry-after",
            "x-correlation-id",
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-reset",
        ])
        .max_age(600);
    if origins.iter().any(|o| o == "*") {
        return Some(cors);
    }
    Some(cors.allow_origins(origins.iter().map(String::as_str)))
}

/// The methods the spec has for `path` (`Allow` of a `405`), taken from the path template that
/// matches it with the most literal segments, as the router picks it.
fn allowed_methods(path: &str) -> Option<String> {
    static PATHS: std::sync::OnceLock<Vec<(Vec<String>, Vec<String>)>> = std::sync::OnceLock::new();
    let paths = PATHS.get_or_init(|| {
        let spec: serde_json::Value = serde_json::from_str(&openapi_json()).expect("the spec is JSON");
        spec["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(template, ops)| {
                let segments = template.split('/').map(str::to_owned).collect();
                let methods = ops.as_object().into_iter().flatten().map(|(m, _)| m.to_uppercase()).collect();
                (segments, methods)
            })
            .collect()
    });
    let wanted: Vec<&str> = path.split('/').collect();
    paths
        .iter()
        .filter(|(segments, _)| {
            segments.len() == wanted.len()
                && segments.iter().zip(&wanted).all(|(s, w)| s == w || (s.starts_with('{') && !w.is_empty()))
        })
        .max_by_key(|(segments, _)| segments.iter().filter(|s| !s.starts_with('{')).count())
        .map(|(_, methods)| methods.join(", "))
}

/// `GET /openapi.json`: the committed spec.
#[poem::handler]
fn spec_json() -> poem::Response {
    poem::Response::builder().content_type("application/json; charset=utf-8").body(openapi_json())
}

/// The reference inbox page (`GET /inbox`): static HTML and a small script, no build step.
/// It takes an end user's token from the address (`#token=…&user=…`) or a form.
#[poem::handler]
fn inbox_page() -> poem::web::Html<&'static str> {
    poem::web::Html(include_str!("inbox.html"))
}

/// Takes or makes the correlation id, runs the request inside a span carrying it, echoes it on
/// the response, and counts refused requests by their error code.
async fn correlate<E: Endpoint>(next: E, mut req: Request) -> poem::Result<Response> {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(herald_shared::intent::new_id);
    req.set_data(CorrelationId(id.clone()));
    let state = req.data::<Arc<AppState>>().expect("the router installs the state").clone();
    let path = req.uri().path().to_owned();
    let metrics = &state.metrics;
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), correlation_id = %id);
    // A caller's W3C `traceparent` makes this request part of its trace.
    herald_shared::telemetry::continue_trace(&span, |name| {
        req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    });
    let result = tracing::Instrument::instrument(next.call(req), span).await;
    let mut response = match result {
        Ok(r) => r.into_response(),
        Err(e) => errors::into_json_response(e),
    };
    if let Ok(value) = id.parse() {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    let status = response.status();
    if status == poem::http::StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = allowed_methods(&path)
        && let Ok(value) = allow.parse()
    {
        response.headers_mut().insert(poem::http::header::ALLOW, value);
    }
    if status.is_client_error() || status.is_server_error() {
        metrics.reject(errors::code_for(status));
    }
    Ok(response)
}
