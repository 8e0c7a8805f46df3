//! Accept → deliver → record, retries, dead letters, direct publishes.

use std::time::Duration;

use herald_shared::deadletter::headers as dlq;
use poem::http::StatusCode;
use serde_json::json;

use crate::support::{Reply, Sink, Stack, eventually, header, webhook_body};

#[tokio::test]
async fn accepted_notification_is_delivered_signed_and_recorded() {
    let mut stack = Stack::start().await;
    let sink = Sink::ok().await;
    let id = stack.send(webhook_body(&sink.url), Some("order-42")).await;

    let got = sink.wait_for(1).await;
    let body = &got[0].body;
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["channel"], "webhook");
    assert_eq!(body["title"], "Shipped");
    assert_eq!(body["body"], "Order 42 is on its way");
    assert_eq!(body["data"], json!({"order": 42}));
    assert_eq!(body["metadata"], json!({"source": "tests"}));
    assert!(got[0].header("user-agent").is_some_and(|ua| ua.starts_with("herald/")));

    let status = stack.wait_status(&id, "delivered").await;
    assert_eq!(status["channels"][0]["channel"], "webhook");
    assert_eq!(status["channels"][0]["attempts"], 1);
    assert!(status["channels"][0]["delivered_at"].is_string());
    // The correlation id travels from the gateway into the webhook.
    assert_eq!(body["correlation_id"], status["correlation_id"]);
    stack.shutdown().await;
}

#[tokio::test]
async fn correlation_id_is_taken_from_the_request_and_echoed() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let resp = stack
        .http
        .post(format!("{}/v1/notifications", stack.base))
        .bearer_auth(&stack.token)
        .header("X-Correlation-Id", "checkout-7")
        .json(&webhook_body(&sink.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers()["x-correlation-id"], "checkout-7");
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["correlation_id"], "checkout-7");
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["correlation_id"], "checkout-7");
}

#[tokio::test]
async fn same_idempotency_key_sends_once_and_answers_the_original_id() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let (s1, first) = stack.post(webhook_body(&sink.url), Some("key-1")).await;
    let (s2, second) = stack.post(webhook_body(&sink.url), Some("key-1")).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["id"], second["id"]);

    sink.wait_for(1).await;
    stack.wait_status(first["id"].as_str().unwrap(), "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1, "the duplicate was sent again");

    // A different key is a different notification.
    let (_, third) = stack.post(webhook_body(&sink.url), Some("key-2")).await;
    assert_ne!(third["id"], first["id"]);
    sink.wait_for(2).await;

    // Keys belong to tenants, even when a tenant name and a key could be spliced together.
    let secret = &stack.config.jwt_secret;
    let scopes = herald_shared::auth::DEFAULT_SCOPES;
    let a = herald_shared::auth::mint(secret, "svc:a", None, scopes, Duration::from_secs(60));
    let b = herald_shared::auth::mint(secret, "svc", None, scopes, Duration::from_secs(60));
    let body = webhook_body(&sink.url).to_string();
    let (_, from_a) = stack.post_raw(&body, Some("x"), Some(&a)).await;
    let (_, from_b) = stack.post_raw(&body, Some("a:x"), Some(&b)).await;
    assert_eq!((&from_a["duplicate"], &from_b["duplicate"]), (&json!(false), &json!(false)));
    assert_ne!(from_a["id"], from_b["id"]);
}

#[tokio::test]
async fn transient_failures_retry_then_deliver() {
    let stack = Stack::start().await;
    let sink = Sink::start(vec![Reply::Status(500), Reply::Status(500)], Reply::Status(200)).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let status = stack.wait_status(&id, "delivered").await;
    assert_eq!(status["channels"][0]["attempts"], 3);
    assert!(status["channels"][0]["last_error"].as_str().unwrap().contains("500"), "{status}");
    assert_eq!(sink.wait_for(3).await.len(), 3);
    assert!(stack.dead_letters().await.is_empty());

    // One status event per attempt, in order.
    let events = stack.status_events().await;
    let summary: Vec<(&str, u64)> =
        events.iter().map(|(subject, e)| (subject.as_str(), e["attempt"].as_u64().unwrap())).collect();
    assert_eq!(
        summary,
        [
            ("herald.status.webhook.retrying", 1),
            ("herald.status.webhook.retrying", 2),
            ("herald.status.webhook.delivered", 3)
        ]
    );
    for (_, e) in &events {
        assert_eq!(e["notification_id"], id.as_str());
        assert!(e["correlation_id"].is_string());
    }
    assert!(events[0].1["error"].as_str().unwrap().contains("500"));
}

#[tokio::test]
async fn deliveries_in_flight_are_bounded() {
    let stack = Stack::start_with(&[
        (herald_shared::config::SEND_CONCURRENCY, "2"),
        (herald_shared::config::SEND_TIMEOUT, "2s"),
    ])
    .await;
    let sink = Sink::start(vec![], Reply::Slow(300)).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(stack.send(webhook_body(&sink.url), None).await);
    }
    for id in &ids {
        stack.wait_status(id, "delivered").await;
    }
    assert_eq!(sink.max_in_flight(), 2, "the worker must send at most 2 at once, and did reach 2");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let stack = Stack::start().await;
    let sink = Sink::start(vec![Reply::TooManyRequests(1)], Reply::Status(200)).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let got = sink.wait_for(2).await;
    let waited = got[1].at - got[0].at;
    // The configured backoff is 50 ms; the sink asked for a second.
    assert!(waited >= Duration::from_millis(950), "retried after {waited:?}");
    stack.wait_status(&id, "delivered").await;
}

#[tokio::test]
async fn permanent_failure_goes_to_the_dlq_at_once() {
    let stack = Stack::start().await;
    let sink = Sink::start(vec![], Reply::Status(400)).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let status = stack.wait_status(&id, "dead_lettered").await;
    assert_eq!(status["channels"][0]["attempts"], 1);
    let dl = stack.wait_dead_letters(1).await;
    assert_eq!(dl[0].subject.as_str(), "herald.dlq.webhook");
    assert_eq!(header(&dl[0], dlq::REASON), "rejected");
    assert_eq!(header(&dl[0], dlq::ERROR_CLASS), "permanent");
    assert_eq!(header(&dl[0], dlq::ATTEMPTS), "1");
    assert!(header(&dl[0], dlq::LAST_ERROR).contains("400"));
    assert_eq!(header(&dl[0], dlq::ORIGINAL_SUBJECT), "herald.intent.webhook");
    assert_eq!(header(&dl[0], dlq::ORIGINAL_SEQUENCE), "1");
    // The original intent is kept whole.
    let intent = herald_shared::Intent::from_message(
        &dl[0].payload,
        Some(&dl[0].headers),
        herald_shared::Channel::Webhook,
        None,
    )
    .unwrap();
    assert_eq!(intent.id, id);
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1, "a permanent failure was retried");
}

#[tokio::test]
async fn a_receiver_that_never_answers_is_dead_lettered_after_the_maximum_attempts() {
    let stack = Stack::start().await;
    let sink = Sink::start(vec![], Reply::Hang).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    let dl = stack.wait_dead_letters(1).await;
    assert_eq!(header(&dl[0], dlq::REASON), "attempts_exhausted");
    assert_eq!(header(&dl[0], dlq::ERROR_CLASS), "transient");
    assert_eq!(header(&dl[0], dlq::ATTEMPTS), "3");
    assert!(header(&dl[0], dlq::LAST_ERROR).contains("timed out"));
    let status = stack.wait_status(&id, "dead_lettered").await;
    assert_eq!(status["channels"][0]["attempts"], 3);
    assert_eq!(sink.received().len(), 3);
}

#[tokio::test]
async fn direct_json_publish_with_the_same_msg_id_delivers_once() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let intent =
        json!({"recipient": {"webhook_url": sink.url}, "content": {"body": "from nats pub"}}).to_string();
    assert!(!stack.publish_intent(intent.clone().into_bytes(), Some("order-43"), None).await);
    assert!(
        stack.publish_intent(intent.into_bytes(), Some("order-43"), None).await,
        "second publish not a duplicate"
    );
    let got = sink.wait_for(1).await;
    // Without an `id` in the body, the message id names the notification.
    assert_eq!(got[0].body["id"], "order-43");
    assert_eq!(got[0].body["body"], "from nats pub");
    let status = stack.wait_status("order-43", "delivered").await;
    assert_eq!(status["channels"][0]["attempts"], 1);
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_worker_keeps_going() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let garbage: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    stack.publish_intent(garbage.clone(), Some("poison-1"), None).await;
    // Valid JSON, wrong shape; and the right shape with a bad URL.
    stack.publish_intent(br#"{"recipient": 5}"#.to_vec(), None, Some("application/json")).await;
    stack
        .publish_intent(br#"{"id":"x1","recipient":{"webhook_url":"gopher://h"}}"#.to_vec(), None, None)
        .await;
    let good = json!({"id": "after-poison", "recipient": {"webhook_url": sink.url}, "content": {"body": "still here"}});
    stack.publish_intent(good.to_string().into_bytes(), None, None).await;

    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["id"], "after-poison");
    let dl = stack.wait_dead_letters(3).await;
    let reasons: Vec<String> = dl.iter().map(|m| header(m, dlq::REASON)).collect();
    assert_eq!(reasons, ["undecodable", "undecodable", "invalid"]);
    assert_eq!(dl[0].payload.as_ref(), garbage.as_slice(), "the poison payload must be kept byte for byte");
    assert!(header(&dl[2], dlq::LAST_ERROR).contains("recipient.webhook_url"));
    assert_eq!(header(&dl[0], dlq::ATTEMPTS), "1");
}

#[tokio::test]
async fn send_at_delays_delivery() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let mut body = webhook_body(&sink.url);
    body["send_at"] = json!(at.to_rfc3339());
    let (status, answer) = stack.post(body, Some("later")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "scheduled");
    let id = answer["id"].as_str().unwrap().to_owned();
    let (_, record) = stack.get(&id).await;
    assert_eq!(record["status"], "scheduled");
    let got = sink.wait_for(1).await;
    let now = chrono::Utc::now();
    assert!(now >= at, "delivered early: {now} < {at}");
    assert_eq!(got[0].body["id"], id.as_str());
    stack.wait_status(&id, "delivered").await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_deliveries() {
    let mut stack = Stack::start_with(&[(herald_shared::config::SEND_TIMEOUT, "5s")]).await;
    let sink = Sink::start(vec![], Reply::Slow(1000)).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    // The request has reached the receiver, which takes a second to answer: stop now. The
    // worker claimed the delivery before sending it.
    sink.wait_for(1).await;
    let (_, during) = stack.get(&id).await;
    assert_eq!(during["status"], "sending", "{during}");
    stack.shutdown().await;
    // After shutdown returns, the delivery is recorded (nothing left half-done).
    let record = stack.record(&id).await.unwrap();
    assert_eq!(record.overall(), herald_shared::state::Status::Delivered);
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let stack = Stack::start_with(&[(herald_shared::config::WEBHOOK_ALLOW_PRIVATE, "false")]).await;
    let sink = Sink::ok().await;
    let by_name = sink.url.replace("127.0.0.1", "localhost");
    let by_address = stack.send(webhook_body(&sink.url), None).await;
    let by_name = stack.send(webhook_body(&by_name), None).await;
    let dl = stack.wait_dead_letters(2).await;
    for m in &dl {
        assert_eq!(header(m, dlq::REASON), "rejected");
        assert!(header(m, dlq::LAST_ERROR).contains("private"), "{}", header(m, dlq::LAST_ERROR));
    }
    for id in [by_address, by_name] {
        let status = stack.wait_status(&id, "dead_lettered").await;
        assert_eq!(status["channels"][0]["attempts"], 1, "refused at once, not retried");
    }
    assert!(sink.received().is_empty(), "nothing may reach a private address");
}

#[tokio::test]
async fn a_delivered_notification_is_not_sent_again_by_a_later_message() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let intent = json!({"id": "once", "recipient": {"webhook_url": sink.url}, "content": {"body": "b"}});
    stack.publish_intent(intent.to_string().into_bytes(), Some("once-a"), None).await;
    stack.wait_status("once", "delivered").await;
    // The same notification again under another message id (past the duplicate window, say).
    stack.publish_intent(intent.to_string().into_bytes(), Some("once-b"), None).await;
    let done = herald_shared::topology::INTENTS_STREAM;
    crate::support::eventually(Duration::from_secs(10), "the second message to be acknowledged", || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stack.js.get_consumer_from_stream("webhook", done).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.ack_floor.stream_sequence >= 2).then_some(())
    })
    .await;
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test]
async fn a_recreated_consumer_replays_the_stream_without_sending_again() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let first = stack.send(webhook_body(&sink.url), None).await;
    let second = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&first, "delivered").await;
    stack.wait_status(&second, "delivered").await;
    // An operator deletes the consumer; the worker recreates it, from the stream's start.
    let intents = stack.js.get_stream(herald_shared::topology::INTENTS_STREAM).await.unwrap();
    intents.delete_consumer("webhook").await.unwrap();
    crate::support::eventually(Duration::from_secs(15), "the consumer to be back and caught up", || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            intents.get_consumer("webhook").await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.ack_floor.stream_sequence >= 2).then_some(())
    })
    .await;
    assert_eq!(sink.received().len(), 2, "replayed messages were sent again");
}

#[tokio::test]
async fn a_direct_publish_with_a_future_send_at_waits_for_it() {
    let stack = Stack::start().await;
    let sink = Sink::ok().await;
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let intent = json!({
        "id": "later-direct", "recipient": {"webhook_url": sink.url},
        "content": {"body": "b"}, "send_at": at.to_rfc3339()
    });
    stack.publish_intent(intent.to_string().into_bytes(), None, None).await;
    stack.wait_status("later-direct", "scheduled").await;
    sink.wait_for(1).await;
    let now = chrono::Utc::now();
    assert!(now >= at, "delivered early: {now} < {at}");
    stack.wait_status("later-direct", "delivered").await;
}

/// A stopped worker leaves nothing behind that must wait out an ack wait: it pulled only what
/// it started, finished that, and the next worker takes the rest at once.
#[tokio::test]
async fn a_stopped_worker_leaves_nothing_waiting_for_its_ack_wait() {
    let mut stack = Stack::start_with(&[
        (herald_shared::config::SEND_CONCURRENCY, "1"),
        (herald_shared::config::SEND_TIMEOUT, "3s"),
    ])
    .await;
    let sink = Sink::start(vec![], Reply::Slow(700)).await;
    for id in ["queued-1", "queued-2", "queued-3"] {
        let intent = json!({"id": id, "recipient": {"webhook_url": sink.url}, "content": {"body": "b"}});
        stack.publish_intent(intent.to_string().into_bytes(), None, None).await;
    }
    sink.wait_for(1).await;
    stack.shutdown().await;
    let restarted = std::time::Instant::now();
    let topology = herald_shared::topology::ensure(&stack.js, &stack.config).await.unwrap();
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let worker =
        tokio::spawn(herald_workers::run(stack.config.clone(), topology, Default::default(), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
    for id in ["queued-1", "queued-2", "queued-3"] {
        crate::support::eventually(Duration::from_secs(20), id, || async {
            let record = stack.record(id).await?;
            (record.overall() == herald_shared::state::Status::Delivered).then_some(())
        })
        .await;
    }
    // A message stranded by the first worker would come back only after the ack wait.
    let ack_wait = stack.config.claim_ttl();
    assert!(restarted.elapsed() < ack_wait, "took {:?}; the ack wait is {ack_wait:?}", restarted.elapsed());
    assert_eq!(sink.received().len(), 3);
    stop.send_replace(true);
    worker.await.unwrap().unwrap();
}

/// Priority lanes: with a bulk backlog stuck behind a receiver that holds every request, a
/// `critical` and a `high` notification of the same channel, sent over HTTP or published
/// straight to their lane's subject, are delivered at once: each lane has its own consumer and
/// worker slots.
#[tokio::test]
async fn critical_and_high_overtake_a_stuck_bulk_backlog() {
    let stack = Stack::start_with(&[
        (herald_shared::config::SEND_CONCURRENCY, "2"),
        (herald_shared::config::SEND_TIMEOUT, "60s"),
    ])
    .await;
    let stuck = Sink::start(vec![], Reply::Held).await;
    let fast = Sink::ok().await;
    let backlog: Vec<_> = (0..100)
        .map(|i| {
            let mut body = webhook_body(&stuck.url);
            body["priority"] = json!(if i % 2 == 0 { "low" } else { "normal" });
            body
        })
        .collect();
    let resp = stack
        .http
        .post(format!("{}/v1/notifications/batch", stack.base))
        .bearer_auth(&stack.token)
        .json(&json!({"notifications": backlog}))
        .send()
        .await
        .unwrap();
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["accepted"], 100, "{answer}");
    // The bulk lane's two slots are taken by requests the receiver holds.
    crate::support::eventually(Duration::from_secs(20), "the bulk lane to be stuck", || async {
        (stuck.in_flight() == 2).then_some(())
    })
    .await;

    let mut critical = webhook_body(&fast.url);
    critical["priority"] = json!("critical");
    let critical = stack.send(critical, None).await;
    let mut high = webhook_body(&fast.url);
    high["priority"] = json!("high");
    let high = stack.send(high, None).await;
    let direct = json!({
        "id": "otp-1", "priority": "critical",
        "recipient": {"webhook_url": fast.url}, "content": {"body": "123456"}
    });
    stack
        .js
        .publish_with_headers(
            "herald.intent.webhook.critical",
            {
                let mut h = async_nats::HeaderMap::new();
                h.insert(herald_shared::intent::headers::TENANT, crate::support::TENANT);
                h
            },
            direct.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let got = fast.wait_for(3).await;
    let mut ids: Vec<&str> = got.iter().map(|r| r.body["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut want = vec![critical.as_str(), high.as_str(), "otp-1"];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(stuck.received().len(), 2, "the bulk backlog moved: the test proves nothing");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stack
        .js
        .get_stream(herald_shared::topology::INTENTS_STREAM)
        .await
        .unwrap()
        .get_consumer("webhook")
        .await
        .unwrap();
    assert_eq!(consumer.info().await.unwrap().num_pending, 98, "the backlog waits in the bulk lane");
    stuck.open();
}

/// Every figure an operator of the pipeline asks for, on `/metrics` after known traffic: three
/// delivered, one retried to exhaustion and dead-lettered, one poison message.
#[tokio::test]
async fn metrics_count_intents_attempts_retries_outcomes_and_dead_letters() {
    use crate::support::metric;
    let stack = Stack::start().await;
    let good = Sink::ok().await;
    let bad = Sink::start(vec![], Reply::Status(500)).await;
    let mut delivered = Vec::new();
    for _ in 0..3 {
        delivered.push(stack.send(webhook_body(&good.url), None).await);
    }
    let failing = stack.send(webhook_body(&bad.url), None).await;
    stack.publish_intent(b"\xc1 not messagepack".to_vec(), Some("poison-1"), None).await;
    // And a request the gateway refuses.
    stack.post_raw("{", None, Some(&stack.token)).await;
    for id in &delivered {
        stack.wait_status(id, "delivered").await;
    }
    stack.wait_status(&failing, "dead_lettered").await;
    stack.wait_dead_letters(2).await;
    stack.wait_settled().await;
    // The consumer figures are read every few seconds: wait for them to show the quiet queue.
    let page = eventually(Duration::from_secs(15), "consumer figures", || async {
        let page = stack.metrics().await;
        (metric(&page, r#"herald_consumer_pending_messages{consumer="webhook"}"#) == Some(0.0)
            && metric(&page, r#"herald_consumer_ack_pending_messages{consumer="webhook"}"#) == Some(0.0))
        .then_some(page)
    })
    .await;
    let expect = [
        (r#"herald_gateway_accepted_total{channel="webhook"}"#, 4.0),
        (r#"herald_intents_received_total{channel="webhook"}"#, 4.0),
        (r#"herald_attempts_total{channel="webhook"}"#, 6.0),
        (r#"herald_retries_total{channel="webhook"}"#, 2.0),
        (r#"herald_redeliveries_total{channel="webhook"}"#, 2.0),
        (r#"herald_outcomes_total{channel="webhook",outcome="delivered"}"#, 3.0),
        (r#"herald_outcomes_total{channel="webhook",outcome="retrying"}"#, 2.0),
        (r#"herald_outcomes_total{channel="webhook",outcome="dead_lettered"}"#, 1.0),
        (r#"herald_dead_letters_total{channel="webhook",reason="attempts_exhausted"}"#, 1.0),
        (r#"herald_dead_letters_total{channel="webhook",reason="undecodable"}"#, 1.0),
        (r#"herald_delivery_latency_seconds_count{channel="webhook"}"#, 3.0),
        (r#"herald_provider_calls_total{channel="webhook",provider="webhook"}"#, 6.0),
        (r#"herald_provider_failures_total{channel="webhook",provider="webhook",class="unavailable"}"#, 3.0),
        (r#"herald_consumer_redelivered_messages{consumer="webhook"}"#, 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(metric(&page, series), Some(want), "{series} in\n{page}");
    }
    // Every series the shipped Grafana dashboard queries is one this page has.
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nats/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("herald_") {
                let name: String =
                    expr[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                assert!(
                    page.contains(&format!("\n{name}")),
                    "the dashboard queries {name}, which /metrics lacks"
                );
            }
        }
    }
    // Acceptance to acknowledgement took some time, and less than the test has run.
    let sum = metric(&page, r#"herald_delivery_latency_seconds_sum{channel="webhook"}"#).unwrap();
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
}
