//! The accept path at scale: idempotency keys remembered for the horizon (past the stream's
//! duplicate window), a request's commit surviving a gateway killed right after it, the id a
//! `503` carries, and batches.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use herald_shared::{config, ledger::LedgerKey, topology};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    cli::KillOnDrop,
    support::{Sink, Stack, TENANT, eventually, http_client, webhook_body},
};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// Waits until HERALD_INTENTS no longer remembers message ids stored now: a probe id is
/// published on a subject no consumer reads until the stream stops calling it a duplicate.
async fn wait_out_the_duplicate_window(stack: &Stack) {
    let probe = format!("probe-{}", herald_shared::intent::new_id());
    let publish = || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", probe.as_str());
        let subject = topology::schedule_subject(herald_shared::Channel::Webhook, "window-probe");
        stack.js.publish_with_headers(subject, headers, "probe".into()).await.unwrap().await.unwrap()
    };
    assert!(!publish().await.duplicate);
    assert!(publish().await.duplicate, "the probe was not remembered at all");
    eventually(Duration::from_secs(20), "the duplicate window to pass", || async {
        (!publish().await.duplicate).then_some(())
    })
    .await;
}

/// A1: a client retrying after the stream's 1 s duplicate window, but within the 24 h horizon,
/// gets the original id and `duplicate: true`, and the receiver gets one request.
#[tokio::test]
async fn a_key_reused_after_the_duplicate_window_is_still_a_duplicate() {
    let stack = Stack::start_with(&[(config::DUPLICATE_WINDOW, "1s")]).await;
    let sink = Sink::ok().await;
    let (status, first) = stack.post(webhook_body(&sink.url), Some("order-42-shipped")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let id = first["id"].as_str().unwrap();
    stack.wait_status(id, "delivered").await;
    wait_out_the_duplicate_window(&stack).await;

    let mut intents = stack.js.get_stream(topology::INTENTS_STREAM).await.unwrap();
    let before = intents.info().await.unwrap().state.last_sequence;
    let (status, again) = stack.post(webhook_body(&sink.url), Some("order-42-shipped")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["id"], id);
    assert_eq!(again["duplicate"], true);
    // Nothing was published again, so nothing can be sent again.
    let next = intents.direct_get_next_for_subject("herald.intent.>", Some(before + 1)).await;
    assert!(next.is_err(), "the retry published an intent: {next:?}");
    assert_eq!(sink.received().len(), 1, "the retry was sent again");

    // The key lives in herald_idempotency with a TTL of the horizon (24 h by default).
    let kv = stack.js.get_key_value(topology::IDEMPOTENCY_BUCKET).await.unwrap();
    let name = herald_shared::idempotency::kv_key(Some(TENANT), "order-42-shipped");
    let record: Value = serde_json::from_slice(&kv.get(&name).await.unwrap().unwrap()).unwrap();
    assert_eq!(record["id"], id);
    let stream = stack.js.get_stream(format!("KV_{}", topology::IDEMPOTENCY_BUCKET)).await.unwrap();
    let subject = format!("$KV.{}.{name}", topology::IDEMPOTENCY_BUCKET);
    let stored = stream.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(stored.headers.get("Nats-TTL").map(|v| v.as_str()), Some("86400"), "{:?}", stored.headers);
}

/// A key used again with a different request is refused, naming the mismatch; key order and
/// spacing in the JSON do not make a request different.
#[tokio::test]
async fn a_key_reused_with_another_body_is_refused_and_sends_nothing() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let id = stack.send(webhook_body(&sink.url), Some("k-1")).await;

    let mut other = webhook_body(&sink.url);
    other["content"]["body"] = json!("Order 43 is on its way");
    let (status, answer) = stack.post(other, Some("k-1")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["code"], "idempotency_key_reused");
    assert!(answer["message"].as_str().unwrap().contains(&id), "{answer}");

    // The same request written another way is the same request.
    let reordered = format!(
        r#"{{ "metadata": {{"source": "tests"}}, "data": {{"order": 42}},
             "content": {{"body": "Order 42 is on its way", "title": "Shipped"}},
             "recipient": {{"webhook_url": "{}"}} }}"#,
        sink.url
    );
    let (status, answer) = stack.post_raw(&reordered, Some("k-1"), Some(&stack.token)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!((answer["id"].as_str(), &answer["duplicate"]), (Some(id.as_str()), &json!(true)));

    // The header and the body's key are one key.
    let mut in_body = webhook_body(&sink.url);
    in_body["idempotency_key"] = json!("k-1");
    let (status, answer) = stack.post(in_body, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["id"].as_str(), Some(id.as_str()));
    let mut clash = webhook_body(&sink.url);
    clash["idempotency_key"] = json!("k-2");
    let (status, answer) = stack.post(clash, Some("k-1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["field"], "idempotency_key");

    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1);
}

/// A12: a retry of a scheduled notification after its schedule fired (the stored schedule is
/// gone) answers the original id; it used to be a 409.
#[tokio::test]
async fn a_retry_after_the_schedule_fired_answers_the_original() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let mut body = webhook_body(&sink.url);
    body["send_at"] = json!((chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339());
    let (status, first) = stack.post(body.clone(), Some("later-1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["status"], "scheduled");
    let id = first["id"].as_str().unwrap();
    stack.wait_status(id, "delivered").await;

    let (status, again) = stack.post(body, Some("later-1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!((&again["id"], &again["duplicate"]), (&json!(id), &json!(true)));
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1);
}

/// The key's write is the commit point: a gateway killed right after it (before any intent is
/// published) answered nothing, and the client's retry, to another gateway, finishes the
/// request under the committed id. The receiver gets it once.
#[tokio::test]
async fn a_gateway_killed_between_commit_and_publish_loses_nothing() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let port = herald_shared::nats_server::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut doomed = KillOnDrop(
        Command::new(HERALD)
            .args(["gateway"])
            .env("HERALD_NATS_URL", stack.nats.url())
            .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("HERALD_DATA_DIR", dir.path())
            .env("HERALD_JWT_SECRET", &stack.config.jwt_secret)
            .env("HERALD_FAILPOINTS", "accept.after_commit")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = http_client();
    let doomed_url = format!("http://127.0.0.1:{port}");
    crate::support::wait_ready(&doomed_url).await;

    let body = webhook_body(&sink.url);
    let sent = http
        .post(format!("{doomed_url}/v1/notifications"))
        .bearer_auth(&stack.token)
        .header("Idempotency-Key", "commit-then-die")
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "the gateway answered instead of dying: {sent:?}");
    let exit = eventually(Duration::from_secs(10), "the gateway to die", || {
        let exited = doomed.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(!exit.success());

    // Committed: the key names a notification, which nothing published or recorded.
    let kv = stack.js.get_key_value(topology::IDEMPOTENCY_BUCKET).await.unwrap();
    let name = herald_shared::idempotency::kv_key(Some(TENANT), "commit-then-die");
    let record: Value = serde_json::from_slice(&kv.get(&name).await.unwrap().unwrap()).unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    let key = LedgerKey::new(Some(TENANT), &id, herald_shared::Channel::Webhook);
    assert!(stack.ledger().await.read(&key).await.unwrap().0.is_none());
    let intents = stack.js.get_stream(topology::INTENTS_STREAM).await.unwrap().get_info().await.unwrap();
    assert_eq!(intents.state.messages, 0);

    // The retry goes to a live gateway and finishes it under the committed id.
    let (status, answer) = stack.post(body, Some("commit-then-die")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!((answer["id"].as_str(), &answer["duplicate"]), (Some(id.as_str()), &json!(true)));
    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["id"], id.as_str());
}

/// A `503` carries the id the notification has; retried with that id as its key, the request
/// converges on one notification even when the first attempt's commit landed.
#[tokio::test]
async fn a_503_carries_the_id_to_retry_with() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    // The intents stream refuses the publish (its largest message made tiny): the commit
    // lands, the publish does not.
    let mut intents = stack.js.get_stream(topology::INTENTS_STREAM).await.unwrap();
    let saved = intents.info().await.unwrap().config.clone();
    let refusing = async_nats::jetstream::stream::Config { max_message_size: 16, ..saved.clone() };
    stack.js.update_stream(&refusing).await.unwrap();

    let (status, answer) = stack.post(webhook_body(&sink.url), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let id = answer["notification_id"].as_str().expect("the 503 names the id").to_owned();
    assert!(answer["message"].as_str().unwrap().contains(&id), "{answer}");

    stack.js.update_stream(&saved).await.unwrap();
    let retried = eventually(Duration::from_secs(20), "the retry to be accepted", || async {
        let (status, answer) = stack.post(webhook_body(&sink.url), Some(&id)).await;
        (status == StatusCode::ACCEPTED).then_some(answer)
    })
    .await;
    assert_eq!((retried["id"].as_str(), &retried["duplicate"]), (Some(id.as_str()), &json!(true)));
    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1);
}

async fn post_batch(stack: &Stack, body: &str) -> (StatusCode, Value) {
    let resp = stack
        .http
        .post(format!("{}/v1/notifications/batch", stack.base))
        .bearer_auth(&stack.token)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A batch answers each notification on its own: accepted, duplicate of an earlier key, or
/// that notification's error (a wrong type, an invalid address, a bad key, a reused key), and
/// stores only the accepted ones.
#[tokio::test]
async fn a_batch_answers_each_notification_and_stores_only_the_valid_ones() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let earlier = stack.send(webhook_body(&sink.url), Some("b-dup")).await;
    let item = |key: &str| {
        let mut body = webhook_body(&sink.url);
        body["idempotency_key"] = json!(key);
        body
    };
    let mut wrong_type = item("b-3");
    wrong_type["recipient"]["webhook_url"] = json!(42);
    let mut bad_url = item("b-4");
    bad_url["recipient"]["webhook_url"] = json!("ftp://example.com/hook");
    let mut reused = item("b-dup");
    reused["content"]["title"] = json!("Something else");
    let batch = json!({"notifications": [
        item("b-1"),
        item("b-dup"),
        wrong_type,
        bad_url,
        item("bad key with spaces"),
        reused,
        webhook_body(&sink.url),
        "not an object",
    ]});
    let (status, answer) = post_batch(&stack, &batch.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<u64> = results.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [202, 200, 400, 422, 400, 409, 202, 400], "{answer}");
    assert_eq!(
        (&answer["accepted"], &answer["duplicates"], &answer["failed"]),
        (&json!(2), &json!(1), &json!(5))
    );
    assert_eq!(results[1]["id"], earlier.as_str());
    assert_eq!(results[2]["error"]["field"], "notifications[2].recipient.webhook_url");
    assert_eq!(results[3]["error"]["field"], "notifications[3].recipient.webhook_url");
    assert_eq!(results[4]["error"]["field"], "notifications[4].idempotency_key");
    assert_eq!(results[5]["error"]["code"], "idempotency_key_reused");
    assert_eq!(results[7]["error"]["field"], "notifications[7]");

    let accepted = [results[0]["id"].as_str().unwrap(), results[6]["id"].as_str().unwrap()];
    for id in accepted {
        stack.wait_status(id, "delivered").await;
    }
    stack.wait_settled().await;
    let mut got: Vec<String> =
        sink.received().iter().map(|r| r.body["id"].as_str().unwrap().to_owned()).collect();
    got.sort();
    let mut want = vec![earlier.clone(), accepted[0].to_owned(), accepted[1].to_owned()];
    want.sort();
    assert_eq!(got, want, "only the earlier and the two accepted were delivered");

    // Retrying the whole batch stores nothing new.
    let (status, answer) = post_batch(&stack, &batch.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["results"][0]["status"], 200, "{answer}");
    assert_eq!(answer["results"][0]["id"], accepted[0]);
    assert_eq!(answer["results"][6]["status"], 202, "a notification without a key is new each time");
}

/// The batch itself is checked: empty, over 1,000 notifications, over the batch body limit,
/// not JSON, unknown fields, and no token.
#[tokio::test]
async fn a_malformed_or_oversized_batch_is_refused_whole() {
    let stack = Stack::start_with(&[(config::MAX_BATCH_BYTES, "300000")]).await;
    let one = webhook_body("https://example.com/hook");
    let (status, answer) = post_batch(&stack, r#"{"notifications": []}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["field"], "notifications");
    let many = json!({"notifications": vec![one.clone(); 1001]}).to_string();
    assert!(many.len() < 300_000);
    let (status, answer) = post_batch(&stack, &many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let mut huge = one.clone();
    huge["data"] = json!({"blob": "x".repeat(310_000)});
    let (status, answer) = post_batch(&stack, &json!({"notifications": [huge]}).to_string()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    let (status, _) = post_batch(&stack, "{\"notifications\": [").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, answer) = post_batch(&stack, &json!({"notifications": [one], "extra": 1}).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let resp = stack
        .http
        .post(format!("{}/v1/notifications/batch", stack.base))
        .json(&json!({"notifications": [webhook_body("https://example.com/hook")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let intents = stack.js.get_stream(topology::INTENTS_STREAM).await.unwrap().get_info().await.unwrap();
    assert_eq!(intents.state.messages, 0, "a refused batch stored something");
}
