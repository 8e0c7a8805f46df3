//! Herald's HTTP gateway.
//!
//! - [`api`]: the poem-openapi operations, one struct per resource.
//! - [`accept`]: the accept path, storing intents in JetStream with idempotency.
//! - [`errors`]: every error's HTTP form, in one place.
//! - [`payload`]: `StrictJson`, request bodies whose errors name the field.
//! - [`auth`]: the bearer-token security scheme.
//! - [`metrics`]: Prometheus counters served on `/metrics`.
//! - [`bench`]: `herald bench`, the load generator that measures the gateway.
//!
//! [`Gateway::serve`] runs the server on a listener until a shutdown future completes, so tests
//! drive the real thing on `127.0.0.1:0`. [`openapi_service`] builds the one OpenAPI service
//! used by the router, by `herald openapi` and by the test that checks `openapi.json`.

pub mod accept;
pub mod api;
pub mod auth;
pub mod bench;
pub mod errors;
pub mod metrics;
pub mod payload;

use std::{future::Future, sync::Arc};

use herald_shared::{
    Config,
    topology::{self, Topology},
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
    /// Set when JetStream last refused a write for want of room, cleared by the next stored
    /// intent; `/ready` reports it.
    storage_full: std::sync::atomic::AtomicBool,
}

impl AppState {
    /// The ensured topology, or 503 while NATS has not been reached yet.
    pub fn topology(&self) -> Result<&Topology, ApiError> {
        self.topology.get().ok_or_else(|| {
            ApiError::Unavailable("NATS has not been reached yet; Herald's streams are not ready".into())
        })
    }

    pub(crate) fn note_storage_full(&self, full: bool) {
        self.storage_full.store(full, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn storage_full(&self) -> bool {
        self.storage_full.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The correlation id of the current request (from `X-Correlation-Id` or generated).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

pub const CORRELATION_HEADER: &str = "X-Correlation-Id";

/// The OpenAPI service: every operation, with the spec's metadata.
pub fn openapi_service() -> OpenApiService<(api::NotificationsApi, api::SystemApi), ()> {
    OpenApiService::new((api::NotificationsApi, api::SystemApi), "Herald", env!("CARGO_PKG_VERSION"))
        .description(
            "Notification service on NATS JetStream. Send a notification with \
             `POST /v1/notifications`; follow it with `GET /v1/notifications/{id}`. \
             Authenticate with `Authorization: Bearer <JWT>` (HS256). Errors are JSON \
             `{code, message, field}`.",
        )
        .server("/")
}

/// The spec as committed in `openapi.json`.
pub fn openapi_json() -> String {
    openapi_service().spec() + "\n"
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
        let state = Arc::new(AppState {
            config,
            client,
            topology: tokio::sync::OnceCell::new(),
            metrics: Metrics::default(),
            storage_full: Default::default(),
        });
        let background = state.clone();
        tokio::spawn(async move {
            match topology::ensure_with_retry(&js, &background.config).await {
                Ok(t) => {
                    let _ = background.topology.set(t);
                }
                Err(e) => tracing::error!(error = %e, "cannot use the JetStream topology"),
            }
        });
        Ok(Gateway { state })
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
        let spec = service.spec_endpoint();
        let state = self.state.clone();
        Route::new()
            .nest("/", service)
            .nest("/docs", docs)
            .at("/openapi.json", spec)
            .data(BodyLimit(state.config.max_body_bytes))
            .around(correlate)
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
        let acceptor = TcpAcceptor::from_tokio(listener)?;
        poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(self.app(), shutdown, Some(std::time::Duration::from_secs(10)))
            .await?;
        Ok(())
    }
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
    let metrics = &state.metrics;
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), correlation_id = %id);
    let result = tracing::Instrument::instrument(next.call(req), span).await;
    let mut response = match result {
        Ok(r) => r.into_response(),
        Err(e) => errors::into_json_response(e),
    };
    if let Ok(value) = id.parse() {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        metrics.reject(errors::code_for(status));
    }
    Ok(response)
}
