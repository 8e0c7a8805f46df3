//! Provider resilience shared by every channel: circuit breakers per provider and per webhook
//! host, waits that leave the consumer, and the provider metrics that show them.

use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_shared::config;
use serde_json::Value;

use crate::support::{Reply, Sink, Stack, eventually, metric, webhook_body};

/// The call records of a notification's webhook channel, as GET shows them.
async fn calls(stack: &Stack, id: &str) -> Vec<Value> {
    let (_, body) = stack.get(id).await;
    body["channels"][0]["calls"].as_array().cloned().unwrap_or_default()
}

/// Sends `n` notifications to `url`, 16 at a time; returns their ids.
async fn send_many(stack: &Stack, url: &str, n: usize) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|_| stack.send(webhook_body(url), None))
        .buffer_unordered(16)
        .collect()
        .await
}

/// Measured before breakers (README, the issue): 300 notifications queued for a host that
/// hangs held every delivery slot round after round, and 50 for a healthy host were not
/// delivered within 20 s. With a breaker per host, the hanging host's calls fail fast once it
/// has timed out five times in a row, and the healthy host's notifications go through.
#[tokio::test]
async fn a_hanging_webhook_host_does_not_hold_up_other_hosts() {
    let hanging = Sink::start(vec![], Reply::Hang).await;
    let healthy = Sink::ok().await;
    let stack = Stack::start_with(&[
        (config::SEND_TIMEOUT, "2s"),
        (config::SEND_CONCURRENCY, "64"),
        (config::BREAKER, "5,30s"),
        (config::RETRY_BACKOFF, "5s"),
        (config::MAX_ATTEMPTS, "6"),
    ])
    .await;
    let stuck = send_many(&stack, &hanging.url, 300).await;
    let started = Instant::now();
    send_many(&stack, &healthy.url, 50).await;
    healthy.wait_for(50).await;
    let took = started.elapsed();
    eprintln!(
        "50 notifications to a healthy host delivered {took:?} after they were sent, behind 300 to a hanging one"
    );
    assert!(took < Duration::from_secs(20), "the healthy host waited {took:?}");

    // The hanging host's breaker is open: its calls fail at once, recorded as circuit_open.
    let page = stack.metrics().await;
    let open = metric(&page, r#"herald_provider_breakers_open{channel="webhook",provider="webhook"}"#);
    assert_eq!(open, Some(1.0), "{page}");
    let refused = metric(
        &page,
        r#"herald_provider_failures_total{channel="webhook",provider="webhook",class="circuit_open"}"#,
    );
    assert!(refused.unwrap_or(0.0) > 0.0, "{page}");
    let timeouts = metric(
        &page,
        r#"herald_provider_failures_total{channel="webhook",provider="webhook",class="timeout"}"#,
    );
    assert!(timeouts.unwrap_or(0.0) >= 5.0, "{page}");
    // Far fewer requests reached the hanging host than notifications were sent to it.
    assert!(hanging.received().len() < 300, "{} requests reached the hanging host", hanging.received().len());
    let failed_fast =
        eventually(Duration::from_secs(10), "a notification refused by the open breaker", || async {
            for id in &stuck {
                let c = calls(&stack, id).await;
                if c.iter().any(|c| c["failure"] == "circuit_open") {
                    return Some(c);
                }
            }
            None
        })
        .await;
    assert_eq!(failed_fast[0]["provider"], "webhook");
    assert!(failed_fast[0]["error"].as_str().unwrap().contains("circuit open"), "{failed_fast:?}");
}

/// A receiver answering 503 to everything opens its breaker (status events say
/// `circuit_open`, `/metrics` counts it); while it is open other hosts are delivered to; after
/// the open period one probe goes through, the receiver has recovered, the breaker closes and
/// every notification arrives.
#[tokio::test]
async fn a_failing_host_opens_its_breaker_and_it_closes_when_the_host_recovers() {
    // Five failures, then healthy: the five notifications sent fail once each.
    let flaky = Sink::start(vec![Reply::Status(503); 5], Reply::Status(200)).await;
    let healthy = Sink::ok().await;
    let stack = Stack::start_with(&[
        (config::BREAKER, "3,1s"),
        (config::RETRY_BACKOFF, "300ms"),
        (config::MAX_ATTEMPTS, "20"),
    ])
    .await;
    let ids = send_many(&stack, &flaky.url, 5).await;
    // While the breaker is open, the failure class says so.
    let page = eventually(Duration::from_secs(10), "the breaker to open", || async {
        let page = stack.metrics().await;
        let open = metric(&page, r#"herald_provider_breakers_open{channel="webhook",provider="webhook"}"#);
        (open == Some(1.0)).then_some(page)
    })
    .await;
    assert!(
        metric(
            &page,
            r#"herald_provider_failures_total{channel="webhook",provider="webhook",class="unavailable"}"#
        ) >= Some(3.0),
        "{page}"
    );
    let others = send_many(&stack, &healthy.url, 20).await;
    healthy.wait_for(20).await;
    for id in &ids {
        stack.wait_status(id, "delivered").await;
    }
    for id in &others {
        let c = calls(&stack, id).await;
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0]["failure"].is_null(), "{c:?}");
    }
    // Exactly the scripted failures reached the receiver, then one delivery each: the open
    // breaker kept the rest of the retries off it.
    assert_eq!(flaky.received().len(), 5 + 5);
    let events = stack.status_events().await;
    let open_events = events
        .iter()
        .filter(|(_, e)| e["outcome"] == "retrying")
        .filter(|(_, e)| {
            e["calls"].as_array().is_some_and(|c| c.iter().any(|c| c["failure"] == "circuit_open"))
        })
        .count();
    assert!(open_events > 0, "no retrying event names the open breaker: {events:?}");
    let page = stack.metrics().await;
    assert_eq!(
        metric(&page, r#"herald_provider_breakers_open{channel="webhook",provider="webhook"}"#),
        Some(0.0),
        "{page}"
    );
    let delivered = calls(&stack, &ids[0]).await;
    assert!(
        delivered.last().is_some_and(|c| c["failure"].is_null() && c["latency_ms"].is_u64()),
        "{delivered:?}"
    );
}

/// A retry due in seconds or more leaves the consumer as a scheduled copy, so thousands of
/// notifications waiting for a receiver to come back never fill `max_ack_pending` and stop the
/// channel for everyone (review A4). The copy is delivered when due.
#[tokio::test]
async fn long_retries_wait_outside_the_consumer_and_are_delivered_when_due() {
    let sink = Sink::start(vec![Reply::Status(503); 3], Reply::Status(200)).await;
    let stack = Stack::start_with(&[(config::RETRY_BACKOFF, "4s"), (config::MAX_ATTEMPTS, "3")]).await;
    let ids = send_many(&stack, &sink.url, 3).await;
    for id in &ids {
        stack.wait_status(id, "retrying").await;
    }
    let intents = stack.js.get_stream(herald_shared::topology::INTENTS_STREAM).await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        intents.get_consumer("webhook").await.unwrap();
    let info = eventually(Duration::from_secs(5), "the retries to leave the consumer", || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.ok()?.clone();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(info)
        }
    })
    .await;
    assert_eq!(info.num_redelivered, 0, "nothing waits as a redelivery: {info:?}");
    let started = Instant::now();
    for id in &ids {
        let body = stack.wait_status(id, "delivered").await;
        assert_eq!(body["channels"][0]["attempts"], 2, "{body}");
    }
    assert!(started.elapsed() >= Duration::from_secs(2), "delivered before the retry was due");
    assert_eq!(sink.received().len(), 6);
}
