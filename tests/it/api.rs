//! The HTTP contract: authentication, validation, limits, errors, docs.

use std::time::Duration;

use herald_shared::auth;
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{Sink, Stack, webhook_body};

/// Posts `body` and checks status, error code and the field the error names.
async fn check(stack: &Stack, body: &str, status: u16, code: &str, field: Option<&str>) {
    let (got, answer) = stack.post_raw(body, None, Some(&stack.token)).await;
    assert_eq!(got.as_u16(), status, "{body} -> {answer}");
    assert_eq!(answer["code"], code, "{body} -> {answer}");
    assert_eq!(answer["field"].as_str(), field, "{body} -> {answer}");
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let stack = Stack::start().await;
    let url = "http://127.0.0.1:9/hook";
    for (body, status, code, field) in [
        ("{not json", 400, "malformed_request", None),
        ("", 400, "malformed_request", None),
        ("[1,2]", 400, "malformed_request", None),
        (r#"{"content":{"title":"x"}}"#, 400, "malformed_request", None),
        (r#"{"recipient":"someone"}"#, 400, "malformed_request", Some("recipient")),
        (r#"{"recipient":{"webhook_url":5}}"#, 400, "malformed_request", Some("recipient.webhook_url")),
        (r#"{"recipient":{},"channels":"webhook"}"#, 400, "malformed_request", Some("channels")),
        (r#"{"recipient":{},"channels":["pigeon"]}"#, 400, "malformed_request", Some("channels[0]")),
        (r#"{"recipient":{},"priority":"urgent"}"#, 400, "malformed_request", Some("priority")),
        (r#"{"recipient":{},"send_at":"tomorrow"}"#, 400, "malformed_request", Some("send_at")),
        (r#"{"recipient":{},"data":[1]}"#, 400, "malformed_request", Some("data")),
        (r#"{"recipient":{},"metadata":{"a":1}}"#, 400, "malformed_request", Some("metadata.a")),
        (r#"{"recipient":{},"surprise":true}"#, 400, "malformed_request", Some("surprise")),
        (r#"{"recipient":{"webhook_url":"x"}} trailing"#, 400, "malformed_request", None),
        (r#"{"recipient":{}}"#, 422, "invalid_field", Some("channels")),
        (
            r#"{"recipient":{"webhook_url":"not a url"},"content":{"body":"b"}}"#,
            422,
            "invalid_field",
            Some("recipient.webhook_url"),
        ),
        (
            r#"{"recipient":{"webhook_url":"file:///etc/passwd"},"content":{"body":"b"}}"#,
            422,
            "invalid_field",
            Some("recipient.webhook_url"),
        ),
        (
            r#"{"recipient":{"email":"a@b.c"},"content":{"body":"b"}}"#,
            422,
            "invalid_field",
            Some("channels[0]"),
        ),
        (
            &format!(
                r#"{{"recipient":{{"webhook_url":"{url}"}},"channels":["webhook","sms"],"content":{{"body":"b"}}}}"#
            ),
            422,
            "invalid_field",
            Some("channels[1]"),
        ),
        (
            &format!(r#"{{"recipient":{{"webhook_url":"{url}"}},"channels":[],"content":{{"body":"b"}}}}"#),
            422,
            "invalid_field",
            Some("channels"),
        ),
        (&format!(r#"{{"recipient":{{"webhook_url":"{url}"}}}}"#), 422, "invalid_field", Some("content")),
        (
            &format!(
                r#"{{"recipient":{{"webhook_url":"{url}"}},"content":{{"body":"b"}},"expires_at":"2001-01-01T00:00:00Z"}}"#
            ),
            422,
            "invalid_field",
            Some("expires_at"),
        ),
        (
            &format!(
                r#"{{"recipient":{{"webhook_url":"{url}"}},"content":{{"title":"{}"}}}}"#,
                "t".repeat(2000)
            ),
            422,
            "invalid_field",
            Some("content.title"),
        ),
    ] {
        check(&stack, body, status, code, field).await;
    }
    // Nothing of that reached JetStream.
    let mut intents = stack.js.get_stream("HERALD_INTENTS").await.unwrap();
    assert_eq!(intents.info().await.unwrap().state.messages, 0);
}

#[tokio::test]
async fn bad_idempotency_keys_and_content_types_are_refused() {
    let stack = Stack::start().await;
    let body = webhook_body("http://127.0.0.1:9/hook").to_string();
    for key in ["", &"k".repeat(256), "with space", "naïve"] {
        let resp = stack
            .http
            .post(format!("{}/v1/notifications", stack.base))
            .bearer_auth(&stack.token)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", key.as_bytes())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "key {key:?}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["field"], "Idempotency-Key", "{answer}");
    }
    let resp = stack
        .http
        .post(format!("{}/v1/notifications", stack.base))
        .bearer_auth(&stack.token)
        .header("Content-Type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["code"], "unsupported_media_type");
}

#[tokio::test]
async fn oversized_bodies_get_413_with_or_without_content_length() {
    let stack = Stack::start().await; // limit: 16 KiB
    let mut body = webhook_body("http://127.0.0.1:9/hook");
    body["content"]["body"] = json!("x".repeat(20_000));
    let (status, answer) = stack.post(body.clone(), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["code"], "payload_too_large");

    // Chunked: no Content-Length, so the limit applies while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.to_string().into_bytes().chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let resp = stack
        .http
        .post(format!("{}/v1/notifications", stack.base))
        .bearer_auth(&stack.token)
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn tokens_are_checked() {
    let stack = Stack::start().await;
    let body = webhook_body("http://127.0.0.1:9/hook").to_string();
    let secret = &stack.config.jwt_secret;
    let forged = auth::mint("not-the-secret", "tests", None, auth::DEFAULT_SCOPES, Duration::from_secs(60));
    let expired = auth::encode(
        secret,
        &auth::Claims {
            sub: "tests".into(),
            tenant: None,
            scope: auth::SCOPE_SEND.into(),
            user: None,
            exp: (chrono::Utc::now().timestamp() - 60) as u64,
            iat: 0,
        },
    );
    for (token, status, what) in [
        (None, 401, "missing"),
        (Some("garbage".to_owned()), 401, "malformed"),
        (Some(forged), 401, "forged"),
        (Some(expired), 401, "expired"),
        (
            Some(auth::mint(secret, "tests", None, &[auth::SCOPE_READ], Duration::from_secs(60))),
            403,
            "read-only",
        ),
    ] {
        let (got, answer) = stack.post_raw(&body, None, token.as_deref()).await;
        assert_eq!(got.as_u16(), status, "{what}: {answer}");
        assert!(answer["code"].is_string() && answer["message"].is_string(), "{what}: {answer}");
    }
    let write_only = auth::mint(secret, "tests", None, &[auth::SCOPE_SEND], Duration::from_secs(60));
    let resp = stack
        .http
        .get(format!("{}/v1/notifications/abc", stack.base))
        .bearer_auth(write_only)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn notifications_are_private_to_their_tenant_and_unknown_ids_are_404() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let (status, _) = stack.get(&id).await;
    assert_eq!(status, StatusCode::OK);
    let other = auth::mint(
        &stack.config.jwt_secret,
        "tests",
        Some("globex"),
        auth::DEFAULT_SCOPES,
        Duration::from_secs(60),
    );
    for (path, token) in [
        (id.clone(), other.clone()),
        ("no-such-id".into(), stack.token.clone()),
        ("..%2F..%2Fetc".into(), stack.token.clone()),
    ] {
        let resp = stack
            .http
            .get(format!("{}/v1/notifications/{path}", stack.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["code"], "not_found");
    }
}

#[tokio::test]
async fn health_ready_metrics_docs_and_spec_are_served() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    stack.send(webhook_body(&sink.url), Some("m-1")).await;
    stack.send(webhook_body(&sink.url), Some("m-1")).await;
    stack.post_raw("{", None, Some(&stack.token)).await;
    let get = |path: &str| {
        let url = format!("{}{path}", stack.base);
        let http = stack.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/health").await, (200, r#"{"status":"ok"}"#.to_owned()));
    let (status, ready) = get("/ready").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");
    assert!(ready["users_copy_lag"].is_u64(), "/ready reports how far the users copy is behind: {ready}");
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"herald_gateway_accepted_total{channel="webhook"} 1"#,
        "herald_gateway_duplicates_total 1",
        r#"herald_gateway_rejected_total{reason="malformed_request"} 1"#,
        // The duplicate was answered from its remembered key: nothing was published again.
        "herald_gateway_publish_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    let (status, docs) = get("/docs").await;
    assert_eq!(status, 200);
    assert!(docs.contains("swagger"), "{docs}");
    let (status, spec) = get("/openapi.json").await;
    assert_eq!(status, 200);
    let spec: Value = serde_json::from_str(&spec).unwrap();
    assert!(spec["paths"]["/v1/notifications"]["post"].is_object());
    let (status, unknown) = get("/v2/nothing").await;
    assert_eq!(status, 404);
    assert!(unknown.contains(r#""code":"not_found""#), "{unknown}");
    // The served spec is the committed one.
    assert_eq!(spec, serde_json::from_str::<Value>(&herald_gateway::openapi_json()).unwrap());
}

#[tokio::test]
async fn a_wrong_method_is_405_with_the_allowed_ones() {
    let stack = Stack::start().await;
    for (method, path, allow) in [
        ("DELETE", "/v1/notifications", "GET, POST"),
        ("PUT", "/v1/notifications/abc", "GET"),
        ("GET", "/v1/notifications/batch", "POST"),
        ("POST", "/v1/users/42", "DELETE, GET, PATCH, PUT"),
        ("GET", "/v1/dlq/replay", "POST"),
        ("PATCH", "/v1/dlq/17", "DELETE, GET"),
        ("POST", "/v1/users/42/inbox/stream", "GET"),
    ] {
        let resp = stack
            .http
            .request(method.parse().unwrap(), format!("{}{path}", stack.base))
            .bearer_auth(&stack.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405, "{method} {path}");
        let mut allowed: Vec<&str> =
            resp.headers()["allow"].to_str().unwrap().split(", ").collect::<Vec<_>>();
        allowed.sort_unstable();
        assert_eq!(allowed.join(", "), allow, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "method_not_allowed", "{body}");
    }
}

/// What client generators need of the spec: no `allOf` around a `$ref` (generators refuse
/// it for enums), operation ids that read as method names, and every operation answering
/// something documented.
#[test]
fn the_spec_suits_client_generators() {
    let spec: Value = serde_json::from_str(&herald_gateway::openapi_json()).unwrap();
    assert!(!herald_gateway::openapi_json().contains("allOf"));
    let mut ids = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let id =
                op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{id} is not snake_case");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}");
            ids.push(id.to_owned());
        }
    }
    for id in ["send_notification", "get_notification", "list_notifications", "list_inbox", "stream_inbox"] {
        assert!(ids.iter().any(|i| i == id), "{id} missing from {ids:?}");
    }
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "operation ids are unique");
}

#[test]
fn committed_openapi_json_is_current() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap_or_default();
    let generated = herald_gateway::openapi_json();
    assert!(
        committed == generated,
        "openapi.json is stale: run `cargo run -- openapi` and commit the result"
    );
}

#[tokio::test]
async fn a_body_within_the_limit_that_grows_past_the_intent_limit_is_refused() {
    let limit = herald_shared::config::MAX_BODY_LIMIT.to_string();
    let stack = Stack::start_with(&[(herald_shared::config::MAX_BODY_BYTES, limit.as_str())]).await;
    // `1e1` is 3 bytes of JSON and 9 of MessagePack (a float).
    let numbers = vec!["1e1"; 32_000].join(",");
    let body =
        format!(r#"{{"recipient":{{"webhook_url":"http://127.0.0.1:9/x"}},"data":{{"n":[{numbers}]}}}}"#);
    assert!(body.len() < herald_shared::config::MAX_BODY_LIMIT);
    let (status, answer) = stack.post_raw(&body, None, Some(&stack.token)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("encoded"), "{answer}");
    let mut intents = stack.js.get_stream("HERALD_INTENTS").await.unwrap();
    assert_eq!(intents.info().await.unwrap().state.messages, 0);
}
