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
#[oai(rename = "Health")]
struct HealthBody {
    /// `ok`, `ready` or why not.
    status: String,
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
        Json(HealthBody { status: "ok".into() })
    }

    /// Readiness: NATS is connected, HERALD_INTENTS exists and has room for new notifications.
    #[oai(path = "/ready", method = "get", operation_id = "ready")]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> ReadyResponse {
        if state.client.connection_state() != State::Connected {
            return ReadyResponse::NotReady(Json(HealthBody { status: "not connected to NATS".into() }));
        }
        let Ok(topology) = state.topology() else {
            let status = state.topology_error().unwrap_or("streams not ensured yet").to_owned();
            return ReadyResponse::NotReady(Json(HealthBody { status }));
        };
        let mut intents = topology.intents.clone();
        let check = tokio::time::timeout(state.config.nats_timeout, intents.info());
        match check.await {
            Ok(Ok(_)) => match state.storage_full() {
                Some(why) => ReadyResponse::NotReady(Json(HealthBody {
                    status: format!(
                        "storage_full: new notifications are refused: {why} (see HERALD_MAX_STORAGE)"
                    ),
                })),
                None => ReadyResponse::Ready(Json(HealthBody { status: "ready".into() })),
            },
            Ok(Err(e)) => {
                ReadyResponse::NotReady(Json(HealthBody { status: format!("stream {INTENTS_STREAM}: {e}") }))
            }
            Err(_) => {
                ReadyResponse::NotReady(Json(HealthBody { status: "NATS did not answer in time".into() }))
            }
        }
    }

    /// Prometheus metrics (text exposition format).
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self, state: Data<&Arc<AppState>>) -> PlainText<String> {
        PlainText(state.metrics.render())
    }
}
