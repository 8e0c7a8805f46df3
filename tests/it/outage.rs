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

#[tokio::test]
async fn a_gateway_started_before_nats_answers_503_then_recovers() {
    // A server that is down: its port and store are known, the process is not running.
    let mut nats =
        tokio::task::spawn_blocking(herald_shared::nats_server::NatsServer::for_test).await.unwrap();
    nats.stop();
    let url = nats.url();
    let config = herald_shared::Config::from_pairs(&[
        (herald_shared::config::NATS_URL, url.as_str()),
        (herald_shared::config::NATS_TIMEOUT, "1s"),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let gateway = herald_gateway::Gateway::connect(config.clone()).await.unwrap();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async move {
        let _ = stop_rx.await;
    }));

    let http = crate::support::http_client();
    let token = herald_shared::auth::mint(
        &config.jwt_secret,
        "tests",
        None,
        herald_shared::auth::DEFAULT_SCOPES,
        Duration::from_secs(60),
    );
    let post = || {
        http.post(format!("{base}/v1/notifications"))
            .bearer_auth(&token)
            .json(&webhook_body("http://127.0.0.1:9/hook"))
            .send()
    };
    assert_eq!(http.get(format!("{base}/health")).send().await.unwrap().status(), 200);
    let started = Instant::now();
    assert_eq!(http.get(format!("{base}/ready")).send().await.unwrap().status(), 503);
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["code"], "unavailable");

    nats.restart().unwrap();
    eventually(Duration::from_secs(20), "the gateway to accept once NATS is up", || async {
        (post().await.ok()?.status() == 202).then_some(())
    })
    .await;
    assert_eq!(http.get(format!("{base}/ready")).send().await.unwrap().status(), 200);
}
