//! NATS going away and coming back.

use std::time::{Duration, Instant};

use poem::http::StatusCode;

use crate::support::{Sink, Stack, eventually, webhook_body};

#[tokio::test]
async fn nats_down_answers_503_quickly_and_recovers_by_itself() {
    let mut stack = Stack::start().await;
    let sink = Sink::ok().await;
    stack.send(webhook_body(&sink.url), None).await;

    stack.nats.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, answer) = stack.post(webhook_body(&sink.url), Some("during-outage")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(answer["code"], "unavailable");
        assert!(started.elapsed() < Duration::from_secs(2), "503 took {:?}", started.elapsed());

        let started = Instant::now();
        let resp = stack.http.get(format!("{}/ready", stack.base)).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(started.elapsed() < Duration::from_secs(2), "/ready took {:?}", started.elapsed());
    }
    let resp = stack.http.get(format!("{}/health", stack.base)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "liveness does not depend on NATS");

    stack.nats.restart().unwrap();
    let id = eventually(Duration::from_secs(20), "the gateway to accept again", || async {
        let (status, answer) = stack.post(webhook_body(&sink.url), Some("after-outage")).await;
        (status == StatusCode::ACCEPTED).then(|| answer["id"].as_str().unwrap().to_owned())
    })
    .await;
    let resp = stack.http.get(format!("{}/ready", stack.base)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // The worker reconnected too.
    stack.wait_status(&id, "delivered").await;
}
