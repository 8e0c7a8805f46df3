//! Slow, stalled and greedy clients: read timeouts for headers and bodies, the connection cap
//! and the in-flight cap all answer or close, and never hang. Raw TCP clients play the
//! attacker.

use std::time::{Duration, Instant};

use herald_shared::config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{Stack, eventually, webhook_body};

fn addr(stack: &Stack) -> String {
    stack.base.trim_start_matches("http://").to_owned()
}

/// Opens a connection and sends an authorized request's headers (`Content-Length: 1000`) and
/// one byte of its body, then nothing more.
async fn stall_a_body(stack: &Stack) -> TcpStream {
    let mut s = TcpStream::connect(addr(stack)).await.unwrap();
    let head = format!(
        "POST /v1/notifications HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        stack.token
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok().map(|()| String::from_utf8_lossy(&got).into_owned())
}

/// 50 connections that stop halfway through their headers, and one that trickles a byte every
/// 200 ms, are all closed once the header timeout passes; a normal request meanwhile succeeds.
#[tokio::test]
async fn connections_that_stall_or_trickle_their_headers_are_closed() {
    let stack = Stack::start_with(&[(config::HEADER_READ_TIMEOUT, "1s")]).await;
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr(&stack)).await.unwrap();
        s.write_all(b"POST /v1/notifications HTTP/1.1\r\nHost: herald\r\nContent-Ty").await.unwrap();
        stalled.push(s);
    }
    let mut trickler = TcpStream::connect(addr(&stack)).await.unwrap();
    let trickle = tokio::spawn(async move {
        for b in
            b"GET /health HTTP/1.1\r\nHost: herald\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .iter()
        {
            if trickler.write_all(&[*b]).await.is_err() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the trickling client was never cut off");
    });
    let (status, answer) = stack.post(webhook_body("https://example.com/hook"), None).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{answer}");
    for s in &mut stalled {
        let answer =
            read_to_close(s, Duration::from_secs(20)).await.expect("a stalled connection stayed open");
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    println!("50 stalled connections closed {:?} after they connected", started.elapsed());
    let cut = trickle.await.unwrap();
    assert!(
        cut - started < Duration::from_secs(15),
        "the trickler was cut off only after {:?}",
        cut - started
    );
}

/// 50 authorized requests that send their headers and one byte of a 1,000-byte body are
/// answered `408` once the body timeout passes, and nothing is stored.
#[tokio::test]
async fn bodies_that_never_arrive_are_answered_408() {
    let stack = Stack::start_with(&[(config::BODY_READ_TIMEOUT, "1s")]).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(stall_a_body(&stack).await);
    }
    for s in &mut slow {
        let answer =
            read_to_close(s, Duration::from_secs(20)).await.expect("a slow body's connection stayed open");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
    let intents =
        stack.js.get_stream(herald_shared::topology::INTENTS_STREAM).await.unwrap().get_info().await;
    assert_eq!(intents.unwrap().state.messages, 0);
}

/// Past `HERALD_MAX_CONNECTIONS`, a new connection is answered `503` with `Retry-After` and
/// closed at once; once connections close, requests are served again.
#[tokio::test]
async fn the_connection_cap_answers_rather_than_hangs() {
    let stack = Stack::start_with(&[(config::MAX_CONNECTIONS, "5")]).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(addr(&stack)).await.unwrap());
    }
    // The acceptor counts a connection when it takes it: wait until it has taken all five.
    let answer = eventually(Duration::from_secs(10), "a connection over the cap to be refused", || async {
        let mut extra = TcpStream::connect(addr(&stack)).await.ok()?;
        let answer = read_to_close(&mut extra, Duration::from_secs(5)).await?;
        answer.starts_with("HTTP/1.1 503").then_some(answer)
    })
    .await;
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    drop(held);
    eventually(Duration::from_secs(10), "requests to be served again", || async {
        let resp = stack.http.get(format!("{}/health", stack.base)).send().await.ok()?;
        resp.status().is_success().then_some(())
    })
    .await;
}

/// Past `HERALD_MAX_IN_FLIGHT` requests in the handlers at once, the next is answered `503
/// overloaded` with `Retry-After: 1` at once; `/health` still answers.
#[tokio::test]
async fn the_in_flight_cap_answers_503_at_once() {
    let stack = Stack::start_with(&[(config::MAX_IN_FLIGHT, "2"), (config::BODY_READ_TIMEOUT, "30s")]).await;
    // Two requests whose bodies are still arriving hold the two places.
    let mut holding = Vec::new();
    for _ in 0..2 {
        holding.push(stall_a_body(&stack).await);
    }
    let refused = eventually(Duration::from_secs(10), "a request over the cap to be refused", || async {
        let started = Instant::now();
        let resp = stack
            .http
            .post(format!("{}/v1/notifications", stack.base))
            .bearer_auth(&stack.token)
            .json(&webhook_body("https://example.com/hook"))
            .send()
            .await
            .ok()?;
        (resp.status() == 503).then_some((resp, started.elapsed()))
    })
    .await;
    let (resp, took) = refused;
    assert!(took < Duration::from_secs(5), "the refusal took {took:?}");
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "overloaded", "{body}");
    let health = stack.http.get(format!("{}/health", stack.base)).send().await.unwrap();
    assert!(health.status().is_success());
    drop(holding);
    eventually(Duration::from_secs(10), "requests to be accepted again", || async {
        let (status, _) = stack.post(webhook_body("https://example.com/hook"), None).await;
        (status == reqwest::StatusCode::ACCEPTED).then_some(())
    })
    .await;
}

fn token_for(stack: &Stack, sub: &str, tenant: &str) -> String {
    herald_shared::auth::mint(
        &stack.config.jwt_secret,
        sub,
        Some(tenant),
        herald_shared::auth::DEFAULT_SCOPES,
        Duration::from_secs(600),
    )
}

async fn post_as(stack: &Stack, token: &str) -> reqwest::Response {
    stack
        .http
        .post(format!("{}/v1/notifications", stack.base))
        .bearer_auth(token)
        .json(&webhook_body("https://example.com/hook"))
        .send()
        .await
        .unwrap()
}

/// A tenant sending faster than `HERALD_TENANT_RATE` gets `429` with `Retry-After` and the
/// `RateLimit-*` fields, and what was refused is not stored; another tenant is unaffected;
/// after `Retry-After` it is accepted again. Two tokens of one tenant each have their own
/// `HERALD_TOKEN_RATE`.
#[tokio::test]
async fn senders_over_their_rate_get_429_and_nothing_is_stored() {
    let stack = Stack::start_with(&[(config::TENANT_RATE, "3/m"), (config::TOKEN_RATE, "2/m")]).await;
    let a1 = token_for(&stack, "svc-a1", "acme");
    let a2 = token_for(&stack, "svc-a2", "acme");
    let globex = token_for(&stack, "svc-g", "globex");
    for _ in 0..2 {
        assert_eq!(post_as(&stack, &a1).await.status(), 202);
    }
    // The token's own rate (2 a minute) is spent; the tenant has one left.
    let refused = post_as(&stack, &a1).await;
    assert_eq!(refused.status(), 429);
    let headers = refused.headers().clone();
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    assert_eq!(headers["ratelimit-limit"], "2");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert!(headers.contains_key("ratelimit-reset"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(body["message"].as_str().unwrap().contains("token"), "{body}");
    // The tenant's last send goes through the other token; then the tenant is spent.
    assert_eq!(post_as(&stack, &a2).await.status(), 202);
    let refused = post_as(&stack, &a2).await;
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("tenant"), "{body}");
    // Another tenant is unaffected.
    assert_eq!(post_as(&stack, &globex).await.status(), 202);
    let intents =
        stack.js.get_stream(herald_shared::topology::INTENTS_STREAM).await.unwrap().get_info().await;
    assert_eq!(intents.unwrap().state.messages, 4, "a refused request was stored");
}
