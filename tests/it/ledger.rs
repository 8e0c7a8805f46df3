//! The delivery ledger and the promises that rest on it, one test per way the review
//! (`shared/reviews/spine-2026-11-22.md`, section A) found to lose or repeat a notification.

use std::time::{Duration, Instant};

use herald_shared::{
    Channel, config,
    deadletter::headers as dlq,
    ledger::LedgerKey,
    state::Status,
    topology::{self, ADVISORIES_STREAM, DLQ_MOVER_CONSUMER, INTENTS_STREAM},
};
use poem::http::StatusCode;
use serde_json::json;

use crate::support::{Reply, Sink, Stack, TENANT, eventually, header, webhook_body};

fn direct(id: &str, url: &str) -> Vec<u8> {
    json!({"id": id, "recipient": {"webhook_url": url}, "content": {"body": "b"}}).to_string().into_bytes()
}

/// A2: the receiver said 2xx, then NATS went away before the outcome was recorded. The worker
/// holds the message and keeps trying to record it; nothing is acknowledged unrecorded, and
/// nothing is sent twice once NATS is back.
#[tokio::test]
async fn a_send_whose_outcome_cannot_be_recorded_yet_is_held_not_repeated() {
    let mut stack = Stack::start_with(&[(config::SEND_TIMEOUT, "5s")]).await;
    let sink = Sink::start(vec![], Reply::Slow(1000)).await;
    let id = stack.send(webhook_body(&sink.url), Some("held-1")).await;
    sink.wait_for(1).await;
    stack.nats.stop();
    // The receiver answers 200 while NATS is down: the outcome cannot be recorded now.
    eventually(Duration::from_secs(10), "the receiver to answer", || async {
        (sink.in_flight() == 0).then_some(())
    })
    .await;
    stack.nats.restart().unwrap();
    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1, "sent again after the outcome could not be recorded at once");
}

/// A3: two messages for the same notification handled at the same moment (a republish under
/// another message id): exactly one claims it and sends.
#[tokio::test]
async fn two_messages_for_one_notification_at_once_send_once() {
    let stack = Stack::start_with(&[(config::SEND_CONCURRENCY, "4"), (config::SEND_TIMEOUT, "3s")]).await;
    let sink = Sink::start(vec![], Reply::Slow(800)).await;
    stack.publish_intent(direct("twice", &sink.url), Some("twice-a"), None).await;
    stack.publish_intent(direct("twice", &sink.url), Some("twice-b"), None).await;
    stack.wait_status("twice", "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1, "both handlers sent");
    let entry =
        stack.ledger().await.read(&LedgerKey::new(Some(TENANT), "twice", Channel::Webhook)).await.unwrap();
    assert_eq!(entry.0.unwrap().attempts, 1);
}

/// A5: retries wait what `HERALD_RETRY_BACKOFF` says, also when the steps differ (nats-server
/// used to stretch later steps when the consumer had a backoff list), within 10%.
#[tokio::test]
async fn retries_wait_what_the_backoff_says() {
    let backoff = [1000u64, 3000, 2000];
    let stack = Stack::start_with(&[
        (config::RETRY_BACKOFF, "1s,3s,2s"),
        (config::MAX_ATTEMPTS, "4"),
        (config::SEND_TIMEOUT, "2s"),
    ])
    .await;
    let sink =
        Sink::start(vec![Reply::Status(503), Reply::Status(503), Reply::Status(503)], Reply::Status(200))
            .await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let got = eventually(Duration::from_secs(20), "four attempts", || async {
        let r = sink.received();
        (r.len() >= 4).then_some(r)
    })
    .await;
    stack.wait_status(&id, "delivered").await;
    for (i, expected) in backoff.iter().enumerate() {
        let waited = (got[i + 1].at - got[i].at).as_millis() as f64;
        let expected = *expected as f64;
        println!("retry {}: waited {waited} ms, configured {expected} ms", i + 1);
        assert!(
            (waited - expected).abs() <= expected * 0.10,
            "retry {} waited {waited} ms, not {expected} ± 10%",
            i + 1
        );
    }
}

/// A12: `Retry-After: 0` is a floor of nothing, not a reason to retry at once: the backoff
/// still applies, so the attempts are not burnt in a moment.
#[tokio::test]
async fn retry_after_zero_does_not_burn_attempts() {
    let stack = Stack::start_with(&[(config::RETRY_BACKOFF, "400ms"), (config::MAX_ATTEMPTS, "3")]).await;
    let sink =
        Sink::start(vec![Reply::TooManyRequests(0), Reply::TooManyRequests(0)], Reply::Status(200)).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let got = sink.wait_for(3).await;
    for pair in got.windows(2) {
        let waited = pair[1].at - pair[0].at;
        assert!(waited >= Duration::from_millis(380), "retried after {waited:?} despite a 400 ms backoff");
    }
    let status = stack.wait_status(&id, "delivered").await;
    assert_eq!(status["channels"][0]["attempts"], 3);
}

/// A7: a direct publish near the server's max payload is over the intent limit; parking it
/// whole would exceed the max payload with the dead letter's headers, so it is parked cut,
/// with its length in a header, instead of being redelivered until it ages out.
#[tokio::test]
async fn a_message_too_large_to_park_whole_is_parked_cut() {
    let stack = Stack::start().await;
    let size = 1024 * 1024 - 512;
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    stack.publish_intent(payload.clone(), Some("huge-1"), None).await;
    let dl = stack.wait_dead_letters(1).await;
    assert_eq!(header(&dl[0], dlq::REASON), "invalid");
    assert_eq!(header(&dl[0], dlq::TRUNCATED_FROM), size.to_string());
    assert_eq!(dl[0].payload.as_ref(), &payload[..herald_shared::deadletter::TRUNCATED_BYTES]);
    assert_eq!(header(&dl[0], dlq::ORIGINAL_MSG_ID), "huge-1");
    stack.wait_settled().await;
}

/// A10: ids of direct publishes belong to their tenant: two publishers using `order-43` are
/// two notifications, and one published without a tenant is no tenant's to read.
#[tokio::test]
async fn notification_ids_are_scoped_by_tenant() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    for tenant in [Some("acme"), Some("globex"), None] {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(t) = tenant {
            headers.insert(herald_shared::intent::headers::TENANT, t);
        }
        let msg_id = format!("order-43-{}", tenant.unwrap_or("none"));
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let ack = stack.js.publish_with_headers(
            "herald.intent.webhook",
            headers,
            direct("order-43", &sink.url).into(),
        );
        ack.await.unwrap().await.unwrap();
    }
    let got = sink.wait_for(3).await;
    assert!(got.iter().all(|r| r.body["id"] == "order-43"));
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 3, "one tenant's notification was taken for another's");
    // acme sees its own; globex's and the tenantless one are not acme's to read.
    let (status, body) = stack.get("order-43").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ledger = stack.ledger().await;
    for tenant in [Some("globex"), None] {
        let record = ledger.record(tenant, "order-43").await.unwrap().unwrap();
        assert_eq!(record.tenant.as_deref(), tenant);
        assert_eq!(record.channels[&Channel::Webhook].status, Status::Delivered);
    }
    let secret = &stack.config.jwt_secret;
    let other = herald_shared::auth::mint(
        secret,
        "x",
        Some("initech"),
        herald_shared::auth::DEFAULT_SCOPES,
        Duration::from_secs(60),
    );
    let resp = stack
        .http
        .get(format!("{}/v1/notifications/order-43", stack.base))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// A7 and the mover: a max-deliveries advisory for a notification that was delivered (only its
/// ack was lost) parks nothing; one for an intent nobody finished parks it, once; one for an
/// intent no longer stored parks a marker rather than being dropped with a log line.
#[tokio::test]
async fn the_mover_parks_only_what_nobody_delivered() {
    let mut stack = Stack::start().await;
    let sink = Sink::ok().await;
    stack.publish_intent(direct("done", &sink.url), Some("done"), None).await;
    stack.wait_status("done", "delivered").await;
    stack.shutdown().await;
    // No worker now: this one is stored and never handled.
    stack.publish_intent(direct("abandoned", &sink.url), Some("abandoned"), None).await;

    let topology = topology::ensure(&stack.js, &stack.config).await.unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mover = tokio::spawn(herald_workers::mover::run(topology, 3, stop_rx));
    for seq in [1, 2, 99] {
        // What nats-server publishes when a consumer gives up on a message.
        let advisory = json!({
            "type": "io.nats.jetstream.advisory.v1.max_deliver",
            "stream": INTENTS_STREAM, "consumer": "webhook", "stream_seq": seq, "deliveries": 3
        });
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{INTENTS_STREAM}.webhook");
        stack.js.publish(subject, advisory.to_string().into()).await.unwrap().await.unwrap();
    }
    eventually(Duration::from_secs(15), "both advisories to be handled", || async {
        let stream = stack.js.get_stream(ADVISORIES_STREAM).await.ok()?;
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(DLQ_MOVER_CONSUMER).await.ok()?;
        let info = c.info().await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 0 && info.ack_floor.stream_sequence >= 3)
            .then_some(())
    })
    .await;
    let dl = stack.dead_letters().await;
    let parked: Vec<String> = dl.iter().map(|m| header(m, dlq::ORIGINAL_SEQUENCE)).collect();
    assert_eq!(parked, ["2", "99"]);
    assert_eq!(header(&dl[0], dlq::REASON), "max_deliveries");
    assert!(dl[1].payload.is_empty());
    let why = header(&dl[1], dlq::LAST_ERROR);
    assert!(why.contains("no longer stored"), "{why}");
    let record = stack.record("abandoned").await.unwrap();
    assert_eq!(record.channels[&Channel::Webhook].status, Status::DeadLettered);
    assert_eq!(sink.received().len(), 1);
    stop.send_replace(true);
    mover.await.unwrap().unwrap();
}

/// A9: a process configured with other replicas than the streams have refuses to start
/// instead of scaling every stream for everyone.
#[tokio::test]
async fn a_worker_with_other_replicas_refuses_to_start() {
    let stack = Stack::start().await;
    let mut three = stack.config.clone();
    three.stream_replicas = 3;
    let err = match topology::ensure(&stack.js, &three).await {
        Ok(_) => panic!("ensured a topology with other replicas"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("HERALD_STREAM_REPLICAS"), "{err}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("worker")
        .env(config::NATS_URL, stack.nats.url())
        .env(config::STREAM_REPLICAS, "3")
        .env(config::JWT_SECRET, "unused")
        .env(config::WEBHOOK_SECRET, "unused")
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(20), out).await.expect("the worker did not exit").unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERALD_STREAM_REPLICAS"), "{stderr}");
    let mut intents = stack.js.get_stream(INTENTS_STREAM).await.unwrap();
    assert_eq!(intents.info().await.unwrap().config.num_replicas, 1);
}

/// A6: storage is bounded, and full is decided: past the high-water mark, with its oldest
/// intent still unhandled, the gateway refuses new notifications with 503 `storage_full` and
/// `/ready` says why; everything accepted before is still delivered, and once it is, the
/// gateway accepts again.
#[tokio::test]
async fn a_full_store_refuses_new_notifications_and_loses_none() {
    let stack = Stack::start_with(&[
        (config::MAX_STORAGE, "4MiB"),
        (config::SEND_CONCURRENCY, "8"),
        (config::SEND_TIMEOUT, "60s"),
    ])
    .await;
    let sink = Sink::start(vec![], Reply::Held).await;
    let mut accepted = Vec::new();
    let started = Instant::now();
    let refusal = loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "never refused after {} accepted",
            accepted.len()
        );
        let (status, body) = stack.post(webhook_body(&sink.url), None).await;
        match status {
            StatusCode::ACCEPTED => accepted.push(body["id"].as_str().unwrap().to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => break body,
            other => panic!("{other}: {body}"),
        }
    };
    println!("accepted {} before the store was full", accepted.len());
    assert_eq!(refusal["code"], "storage_full", "{refusal}");
    let ready = stack.http.get(format!("{}/ready", stack.base)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("storage_full"));

    sink.open();
    let delivered =
        eventually(Duration::from_secs(120), "every accepted notification to be delivered", || async {
            let ids: std::collections::HashSet<String> =
                sink.received().iter().filter_map(|r| r.body["id"].as_str().map(str::to_owned)).collect();
            accepted.iter().all(|id| ids.contains(id)).then_some(ids)
        })
        .await;
    assert!(accepted.iter().all(|id| delivered.contains(id)));
    eventually(Duration::from_secs(30), "the gateway to accept again", || async {
        (stack.post(webhook_body(&sink.url), None).await.0 == StatusCode::ACCEPTED).then_some(())
    })
    .await;
}

/// A6 with schedules: HERALD_INTENTS makes room by dropping its oldest messages (nats-server
/// allows schedules only with discard old). Delivered history may go; a pending schedule behind
/// it may not: the gateway refuses new notifications before the cushion in front of it is gone.
#[tokio::test]
async fn a_full_intents_stream_drops_history_but_never_a_pending_schedule() {
    let stack = Stack::start_with(&[(config::MAX_STORAGE, "40MiB")]).await;
    let sink = Sink::ok().await;
    let filler = "x".repeat(8000);
    let body = |send_at: Option<chrono::DateTime<chrono::Utc>>| {
        let mut b = webhook_body(&sink.url);
        b["data"]["filler"] = json!(filler);
        if let Some(at) = send_at {
            b["send_at"] = json!(at.to_rfc3339());
        }
        b
    };
    for _ in 0..300 {
        stack.send(body(None), None).await;
    }
    let scheduled = stack.send(body(Some(chrono::Utc::now() + chrono::Duration::days(1))), None).await;
    let started = Instant::now();
    let mut accepted = 0;
    let refusal = loop {
        assert!(started.elapsed() < Duration::from_secs(120), "never refused after {accepted} more");
        let (status, answer) = stack.post(body(None), None).await;
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => break answer,
            other => panic!("{other}: {answer}"),
        }
    };
    println!("accepted {accepted} after the schedule before the store was full: {refusal}");
    assert_eq!(refusal["code"], "storage_full", "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("a pending schedule"), "{refusal}");
    let mut intents = stack.js.get_stream(INTENTS_STREAM).await.unwrap();
    let first = intents.info().await.unwrap().state.first_sequence;
    assert!(first > 1, "no history was dropped, so the test did not fill the stream");
    let subject = topology::schedule_subject(Channel::Webhook, &scheduled);
    intents.direct_get_first_for_subject(subject).await.expect("the pending schedule was pushed out");
}
