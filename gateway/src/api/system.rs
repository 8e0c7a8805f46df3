use std::sync::Arc;

use async_nats::connection::State;
use herald_shared::topology::INTENTS_STREAM;
use poem::web::Data;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    payload::{Json, PlainText},
};

use super::Tags;
use crate::AppState;

pub struct SystemApi;

#[derive(Object)]
#[oai(rename = "Health", skip_serializing_if_is_none)]
struct HealthBody {
    /// `ok`, `ready` or why not.
    status: String,
    /// (`/ready`) Changes of `herald_users` the gateway's local copy has not applied yet; it
    /// grows while NATS is unreachable. Reported, not a reason to be unready: single-user
    /// reads and writes go to the bucket itself.
    #[oai(skip_serializing_if_is_none)]
    users_copy_lag: Option<u64>,
    /// (`/ready`) The same for every local copy this process keeps, by file (`users-0`,
    /// `templates-0`): in `herald up` the workers' copies of users and templates too.
    #[oai(skip_serializing_if_is_none)]
    copies_lag: Option<std::collections::BTreeMap<String, u64>>,
    /// (`/ready`) Present only when `herald_idempotency` fills its share and forgets its oldest
    /// keys before `HERALD_IDEMPOTENCY_HORIZON`: the age of the oldest key it still holds, in
    /// seconds. Not a reason to be unready; raise `HERALD_MAX_STORAGE`.
    #[oai(skip_serializing_if_is_none)]
    idempotency_keys_kept_s: Option<u64>,
}

impl HealthBody {
    fn new(status: impl Into<String>, state: &AppState) -> HealthBody {
        HealthBody {
            status: status.into(),
            users_copy_lag: Some(state.users_copy.status().lag),
            copies_lag: Some(
                herald_shared::mirror::following().into_iter().map(|(n, s)| (n, s.lag)).collect(),
            ),
            idempotency_keys_kept_s: state.keys_kept().map(|d| d.as_secs()),
        }
    }
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// Connected to NATS and the streams are there.
    #[oai(status = 200)]
    Ready(Json<HealthBody>),
    /// Not connected to NATS, or the streams are missing.
    #[oai(status = 503)]
    NotReady(Json<HealthBody>),
}

#[OpenApi(tag = "Tags::System")]
impl SystemApi {
    /// Liveness: the process answers.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self) -> Json<HealthBody> {
        Json(HealthBody {
            status: "ok".into(),
            users_copy_lag: None,
            copies_lag: None,
            idempotency_keys_kept_s: None,
        })
    }

    /// Readiness: NATS is connected, HERALD_INTENTS exists and has room for new notifications.
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> ReadyResponse {
        if state.client.connection_state() != State::Connected {
            return ReadyResponse::NotReady(Json(HealthBody::new("not connected to NATS", &state)));
        }
        let Ok(topology) = state.topology() else {
            let status = state.topology_error().unwrap_or("streams not ensured yet").to_owned();
            return ReadyResponse::NotReady(Json(HealthBody::new(status, &state)));
        };
        let mut intents = topology.intents.clone();
        let check = tokio::time::timeout(state.config.nats_timeout, intents.info());
        match check.await {
            Ok(Ok(_)) => match state.storage_full() {
                Some(why) => ReadyResponse::NotReady(Json(HealthBody::new(
                    format!("storage_full: new notifications are refused: {why} (see HERALD_MAX_STORAGE)"),
                    &state,
                ))),
                None => ReadyResponse::Ready(Json(HealthBody::new("ready", &state))),
            },
            Ok(Err(e)) => ReadyResponse::NotReady(Json(HealthBody::new(
                format!("stream {INTENTS_STREAM}: {e}"),
                &state,
            ))),
            Err(_) => ReadyResponse::NotReady(Json(HealthBody::new("NATS did not answer in time", &state))),
        }
    }

    /// Prometheus metrics (text exposition format).
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self, state: Data<&Arc<AppState>>) -> PlainText<String> {
        let lag = state.users_copy.status().lag;
        state.metrics.users_copy_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
        for (copy, status) in herald_shared::mirror::following() {
            let gauge = state.metrics.copy_lag.get_or_create(&crate::metrics::CopyLabel { copy });
            gauge.set(i64::try_from(status.lag).unwrap_or(i64::MAX));
        }
        let more = state.more_metrics.lock().expect("never poisoned");
        let parts = std::iter::once(state.metrics.render()).chain(more.iter().map(|render| render()));
        PlainText(herald_shared::telemetry::join_metrics(parts))
    }
}
