//! One trace from the caller to the webhook receiver: a request with a W3C `traceparent` is
//! continued by the gateway, carried in the intent's NATS headers, continued by the worker, and
//! handed on to the receiver; both processes export their spans over OTLP/HTTP to a receiver
//! here that decodes them (JSON, as OTLP/HTTP defines it) and checks they form that one trace.

use std::{
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use poem::{
    EndpointExt, Route, handler,
    http::{HeaderMap, StatusCode},
    post,
    web::{Data, Json},
};
use serde_json::Value;

use crate::{
    cli::KillOnDrop,
    support::{Sink, Stack, WEBHOOK_SECRET, eventually, http_client, serve, webhook_body},
};

type Received = Arc<Mutex<Vec<Value>>>;

/// `POST /v1/traces`, `Content-Type: application/json`, an `ExportTraceServiceRequest`.
#[handler]
fn export(headers: &HeaderMap, body: Json<Value>, received: Data<&Received>) -> (StatusCode, Json<Value>) {
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !json || body.0["resourceSpans"].as_array().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"message": "not an OTLP/JSON trace export"})),
        );
    }
    received.lock().unwrap().push(body.0);
    (StatusCode::OK, Json(serde_json::json!({})))
}

/// (service, name, trace id, span id, parent span id) of every span received.
fn spans(received: &Received) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for batch in received.lock().unwrap().iter() {
        for resource in batch["resourceSpans"].as_array().unwrap() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .and_then(|a| a.iter().find(|kv| kv["key"] == "service.name"))
                .and_then(|kv| kv["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let field = |k: &str| span[k].as_str().unwrap_or_default().to_lowercase();
                    out.push((
                        service.clone(),
                        field("name"),
                        field("traceId"),
                        field("spanId"),
                        field("parentSpanId"),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn a_request_the_worker_and_the_receiver_share_one_trace() {
    // The Stack's own gateway and workers stop at once: the traced ones are children.
    let mut stack = Stack::start().await;
    stack.shutdown().await;
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    let _stop = serve(listener, Route::new().at("/v1/traces", post(export)).data(received.clone()));
    let sink = Sink::ok().await;

    let port = herald_shared::nats_server::free_port();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], data: &str| {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(args)
                .env("HERALD_NATS_URL", stack.nats.url())
                .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{port}"))
                .env("HERALD_DATA_DIR", dir.path().join(data))
                .env("HERALD_JWT_SECRET", &stack.config.jwt_secret)
                .env("HERALD_WEBHOOK_SECRET", WEBHOOK_SECRET)
                .env("HERALD_WEBHOOK_ALLOW_PRIVATE", "true")
                .env("HERALD_OTLP_ENDPOINT", &collector)
                // Export every 100 ms rather than every 5 s.
                .env("OTEL_BSP_SCHEDULE_DELAY", "100")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _gateway = run(&["gateway"], "gateway");
    let _worker = run(&["worker", "--channels", "webhook"], "worker");
    let base = format!("http://127.0.0.1:{port}");
    let http = http_client();
    crate::support::wait_ready(&base).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let resp = http
        .post(format!("{base}/v1/notifications"))
        .bearer_auth(&stack.token)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&webhook_body(&sink.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);

    // The receiver was handed the trace.
    let got = sink.wait_for(1).await;
    let traceparent = got[0].header("traceparent").expect("the webhook carries traceparent").to_owned();
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");

    // Both processes exported spans of that trace: the gateway's request (child of the caller's
    // span), the worker's delivery (child of the request) and its provider call (child of the
    // delivery), whose id is the parent the receiver was given.
    let all = eventually(Duration::from_secs(20), "the spans of both processes", || async {
        let spans = spans(&received);
        let ours: Vec<_> = spans.into_iter().filter(|s| s.2 == trace_id).collect();
        let has = |service: &str, name: &str| ours.iter().any(|s| s.0 == service && s.1 == name);
        (has("herald-gateway", "request")
            && has("herald-worker", "deliver")
            && has("herald-worker", "provider_call"))
        .then_some(ours)
    })
    .await;
    let find = |name: &str| all.iter().find(|s| s.1 == name).unwrap().clone();
    let (request, deliver, call) = (find("request"), find("deliver"), find("provider_call"));
    assert_eq!(request.4, caller_span, "the request continues the caller's span");
    assert_eq!(deliver.4, request.3, "the delivery continues the request");
    assert_eq!(call.4, deliver.3, "the provider call is part of the delivery");
    let handed = traceparent.split('-').nth(2).unwrap();
    assert_eq!(handed, call.3, "the receiver's parent is the provider call");
}
