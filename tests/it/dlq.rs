//! Dead letters worked on by an operator: the core (`herald_shared::dlq`), `/v1/dlq` and
//! `herald dlq`, against a real nats-server, gateway, workers and webhook receiver.

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use herald_shared::{
    auth,
    dlq::{Actor, Bulk, DeadLetters, Filter, Progress, Replayed},
    topology::{self, AUDIT_STREAM},
};
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{Reply, Sink, Stack, TENANT, eventually, webhook_body};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// The dead-letter core on the stack's NATS.
async fn core(stack: &Stack) -> DeadLetters {
    let (_client, js) = topology::connect(&stack.config, "test-dlq").await.unwrap();
    DeadLetters::new(&topology::ensure(&js, &stack.config).await.unwrap())
}

/// An operator's token (no tenant: every tenant's letters), or one bound to `tenant`.
fn admin(stack: &Stack, tenant: Option<&str>) -> String {
    auth::mint(
        &stack.config.jwt_secret,
        "ops-alice",
        tenant,
        &[auth::SCOPE_DLQ_ADMIN],
        Duration::from_secs(600),
    )
}

async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let url = format!("{}{path}", stack.base);
    let mut req = match method {
        "GET" => stack.http.get(url),
        "POST" => stack.http.post(url),
        "DELETE" => stack.http.delete(url),
        _ => unreachable!(),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// DLQ sequences of the letters now in the queue, oldest first.
async fn sequences(stack: &Stack) -> Vec<u64> {
    stack.dead_letters().await.iter().map(|m| m.sequence).collect()
}

/// Successful deliveries per notification id (the sink answered 200).
fn successes(sink: &Sink, failures_first: usize) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for r in sink.received().into_iter().skip(failures_first) {
        *count.entry(r.body["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    count
}

/// Every event in HERALD_AUDIT.
async fn audit_events(stack: &Stack) -> Vec<Value> {
    let mut stream = stack.js.get_stream(AUDIT_STREAM).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn replaying_a_transient_failure_that_now_succeeds_delivers_it_once_with_its_history() {
    // Three attempts, all 503: dead-lettered as attempts_exhausted. Then the receiver recovers.
    let sink = Sink::start(vec![Reply::Status(503); 3], Reply::Status(200)).await;
    let stack = Stack::start().await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&id, "dead_lettered").await;
    let seq = sequences(&stack).await[0];
    let token = admin(&stack, None);

    let (status, letter) = call(&stack, "GET", &format!("/v1/dlq/{seq}"), Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{letter}");
    assert_eq!(letter["letter"]["reason"], "attempts_exhausted");
    assert_eq!(letter["letter"]["notification_id"], id.as_str());
    assert_eq!(letter["intent"]["recipient"]["webhook_url"], sink.url.as_str());
    assert_eq!(letter["ledger"]["status"], "dead_lettered");
    assert_eq!(letter["ledger"]["attempts"], 3);
    assert_eq!(letter["headers"]["Herald-Dlq-Reason"], "attempts_exhausted");

    let (status, replayed) = call(&stack, "POST", &format!("/v1/dlq/{seq}/replay"), Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["outcome"], "requeued");
    let record = stack.wait_status(&id, "delivered").await;
    assert_eq!(record["channels"][0]["attempts"], 4, "history kept: three failed attempts and the replay's");
    stack.wait_settled().await;
    assert_eq!(successes(&sink, 3).get(&id), Some(&1));
    assert_eq!(sink.received().len(), 4);
    assert!(sequences(&stack).await.is_empty(), "the replayed letter left the queue");

    // Replaying it again finds nothing to replay, and sends nothing.
    let (status, again) = call(&stack, "POST", &format!("/v1/dlq/{seq}/replay"), Some(&token), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{again}");
    assert_eq!(again["code"], "not_found");
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 4);

    let audit = audit_events(&stack).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["action"], "replay");
    assert_eq!(audit[0]["actor"], "ops-alice");
    assert_eq!(audit[0]["outcome"], "requeued");
    assert_eq!(audit[0]["dlq_sequence"], seq);
    assert_eq!(audit[0]["notification_id"], id.as_str());
    assert_eq!(audit[0]["count"], 1);
}

#[tokio::test]
async fn replaying_a_letter_whose_notification_was_delivered_after_all_sends_nothing() {
    let sink = Sink::start(vec![Reply::Status(400)], Reply::Status(200)).await;
    let stack = Stack::start().await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&id, "dead_lettered").await;
    let letter = stack.dead_letters().await.remove(0);
    // The same notification arrives again by another message (a publisher's retry with a new
    // message id) and is delivered: the letter is now stale.
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name: &str = name.as_ref();
        if !name.starts_with("Herald-Dlq") {
            headers.insert(name, values[0].as_str());
        }
    }
    headers.insert("Nats-Msg-Id", "another-message");
    stack
        .js
        .publish_with_headers("herald.intent.webhook", headers, letter.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 2);

    let dlq = core(&stack).await;
    let outcome = dlq.replay(letter.sequence, &Actor("tests".into())).await.unwrap();
    assert_eq!(outcome, Replayed::AlreadyDelivered);
    stack.wait_settled().await;
    assert_eq!(sink.received().len(), 2, "nothing sent again");
    assert!(sequences(&stack).await.is_empty());
    assert_eq!(audit_events(&stack).await[0]["outcome"], "already_delivered");
}

#[tokio::test]
async fn two_replays_of_one_letter_at_once_send_it_once() {
    let sink = Sink::start(vec![Reply::Status(400)], Reply::Status(200)).await;
    let stack = Stack::start().await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&id, "dead_lettered").await;
    let seq = sequences(&stack).await[0];
    let dlq = core(&stack).await;
    let actor = Actor("tests".into());
    let (a, b) = tokio::join!(dlq.replay(seq, &actor), dlq.replay(seq, &actor));
    // Both may have read the letter before either deleted it; then both published under the
    // letter's one message id and the stream kept one.
    assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    stack.wait_status(&id, "delivered").await;
    stack.wait_settled().await;
    assert_eq!(successes(&sink, 1).get(&id), Some(&1));
    assert_eq!(sink.received().len(), 2);
}

#[tokio::test]
async fn letters_are_listed_by_every_filter_and_paged() {
    let sink = Sink::start(
        vec![Reply::Status(400), Reply::Status(503), Reply::Status(503), Reply::Status(503)],
        Reply::Status(200),
    )
    .await;
    let stack = Stack::start().await;
    // A rejection, then an exhausted retry, then a poison message published straight to NATS.
    let rejected = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&rejected, "dead_lettered").await;
    let exhausted = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&exhausted, "dead_lettered").await;
    stack.publish_intent(b"\xc1 not msgpack".to_vec(), Some("poison-1"), None).await;
    stack.wait_dead_letters(3).await;
    let token = admin(&stack, None);

    let ids = |page: &Value| -> Vec<String> {
        page["letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["notification_id"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let reasons = |page: &Value| -> Vec<String> {
        page["letters"].as_array().unwrap().iter().map(|l| l["reason"].as_str().unwrap().to_owned()).collect()
    };
    let list = |query: String| {
        let token = token.clone();
        let stack = &stack;
        async move {
            let (status, page) = call(stack, "GET", &format!("/v1/dlq{query}"), Some(&token), None).await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            page
        }
    };
    assert_eq!(reasons(&list("".into()).await), ["rejected", "attempts_exhausted", "undecodable"]);
    assert_eq!(ids(&list("?reason=rejected".into()).await), [rejected.as_str()]);
    assert_eq!(ids(&list("?error_class=transient".into()).await), [exhausted.as_str()]);
    assert_eq!(reasons(&list("?error_class=permanent".into()).await), ["rejected", "undecodable"]);
    assert_eq!(ids(&list("?text=HTTP%20503".into()).await), [exhausted.as_str()]);
    assert_eq!(ids(&list(format!("?notification_id={rejected}")).await), [rejected.as_str()]);
    // The poison message was published with acme's `Herald-Tenant` header.
    assert_eq!(
        reasons(&list("?tenant=acme".into()).await),
        ["rejected", "attempts_exhausted", "undecodable"]
    );
    assert!(reasons(&list("?tenant=globex".into()).await).is_empty());
    assert_eq!(reasons(&list("?channel=webhook&newer_than_seconds=3600".into()).await).len(), 3);
    assert!(reasons(&list("?older_than_seconds=3600".into()).await).is_empty());
    assert!(reasons(&list("?channel=email".into()).await).is_empty());
    // Pages of one, following `next`.
    let first = list("?limit=1".into()).await;
    assert_eq!(ids(&first), [rejected.as_str()]);
    let next = first["next"].as_u64().unwrap();
    let (_, second) = call(&stack, "GET", &format!("/v1/dlq?limit=1&after={next}"), Some(&token), None).await;
    assert_eq!(ids(&second), [exhausted.as_str()]);
    let all = list("?limit=10".into()).await;
    assert!(all["next"].is_null(), "the end of the queue is said: {all}");

    // The poison letter cannot be replayed; it says why.
    let poison = all["letters"][2]["sequence"].as_u64().unwrap();
    assert!(all["letters"][2]["decode_error"].as_str().unwrap().contains("msgpack"));
    let (status, refused) =
        call(&stack, "POST", &format!("/v1/dlq/{poison}/replay"), Some(&token), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["code"], "not_replayable");
    assert!(refused["message"].as_str().unwrap().contains("undecodable"), "{refused}");

    // The same listing from the command line, as a script reads it.
    let out = Command::new(HERALD)
        .args(["dlq", "list", "--json", "--reason", "attempts_exhausted"])
        .env("HERALD_NATS_URL", stack.nats.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["notification_id"], exhausted.as_str());
    assert_eq!(lines[0]["parked"]["reason"], "attempts_exhausted");
    let table =
        Command::new(HERALD).args(["dlq", "list"]).env("HERALD_NATS_URL", stack.nats.url()).output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("SEQ") && table.contains(&rejected) && table.contains("end of the dead-letter queue"),
        "{table}"
    );
    let show = Command::new(HERALD)
        .args(["dlq", "show", &poison.to_string()])
        .env("HERALD_NATS_URL", stack.nats.url())
        .output()
        .unwrap();
    let show = String::from_utf8(show.stdout).unwrap();
    assert!(show.contains("undecodable") && show.contains("do not decode"), "{show}");
}

#[tokio::test]
async fn dlq_endpoints_refuse_bad_and_hostile_requests_clearly() {
    let sink = Sink::start(vec![Reply::Status(400)], Reply::Status(200)).await;
    let stack = Stack::start().await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    stack.wait_status(&id, "dead_lettered").await;
    let seq = sequences(&stack).await[0];
    let token = admin(&stack, None);
    let check = |method: &'static str,
                 path: String,
                 token: Option<String>,
                 body: Option<Value>,
                 status: StatusCode,
                 code: &'static str| {
        let stack = &stack;
        async move {
            let (got, answer) = call(stack, method, &path, token.as_deref(), body).await;
            assert_eq!(got, status, "{method} {path}: {answer}");
            assert_eq!(answer["code"], code, "{method} {path}: {answer}");
            answer
        }
    };
    let t = || Some(token.clone());
    check("GET", "/v1/dlq".into(), None, None, StatusCode::UNAUTHORIZED, "unauthorized").await;
    check("GET", "/v1/dlq".into(), Some(stack.token.clone()), None, StatusCode::FORBIDDEN, "forbidden").await;
    check("GET", "/v1/dlq/abc".into(), t(), None, StatusCode::BAD_REQUEST, "malformed_request").await;
    check("GET", "/v1/dlq/-1".into(), t(), None, StatusCode::BAD_REQUEST, "malformed_request").await;
    check("GET", "/v1/dlq/99999".into(), t(), None, StatusCode::NOT_FOUND, "not_found").await;
    check("GET", "/v1/dlq?limit=0".into(), t(), None, StatusCode::BAD_REQUEST, "malformed_request").await;
    check("GET", "/v1/dlq?reason=bogus".into(), t(), None, StatusCode::BAD_REQUEST, "malformed_request")
        .await;
    check(
        "GET",
        format!("/v1/dlq?text={}", "x".repeat(300)),
        t(),
        None,
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check("DELETE", format!("/v1/dlq/{seq}"), t(), None, StatusCode::BAD_REQUEST, "malformed_request").await;
    check(
        "DELETE",
        format!("/v1/dlq/{seq}?reason="),
        t(),
        None,
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check(
        "POST",
        "/v1/dlq/replay".into(),
        t(),
        Some(json!({"rate": 0})),
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check(
        "POST",
        "/v1/dlq/replay".into(),
        t(),
        Some(json!({"rate": "fast"})),
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check(
        "POST",
        "/v1/dlq/replay".into(),
        t(),
        Some(json!({"rate": 5, "filter": {"colour": "red"}})),
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check(
        "POST",
        "/v1/dlq/replay".into(),
        t(),
        Some(json!([1, 2])),
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check(
        "POST",
        "/v1/dlq/discard".into(),
        t(),
        Some(json!({"rate": 5})),
        StatusCode::BAD_REQUEST,
        "malformed_request",
    )
    .await;
    check("GET", "/v1/dlq/jobs/nope".into(), t(), None, StatusCode::NOT_FOUND, "not_found").await;
    // A token bound to another tenant sees nothing of acme's, and cannot ask for it.
    let globex = Some(admin(&stack, Some("globex")));
    check("GET", format!("/v1/dlq/{seq}"), globex.clone(), None, StatusCode::NOT_FOUND, "not_found").await;
    check("POST", format!("/v1/dlq/{seq}/replay"), globex.clone(), None, StatusCode::NOT_FOUND, "not_found")
        .await;
    check(
        "DELETE",
        format!("/v1/dlq/{seq}?reason=mine"),
        globex.clone(),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    check(
        "GET",
        "/v1/dlq?tenant=acme".into(),
        globex.clone(),
        None,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    )
    .await;
    let (_, page) = call(&stack, "GET", "/v1/dlq", globex.as_deref(), None).await;
    assert_eq!(page["letters"].as_array().unwrap().len(), 0, "{page}");
    let (_, page) = call(&stack, "GET", "/v1/dlq", Some(&admin(&stack, Some(TENANT))), None).await;
    assert_eq!(page["letters"].as_array().unwrap().len(), 1, "{page}");
    // Nothing above changed the queue.
    assert_eq!(sequences(&stack).await, [seq]);
    assert!(audit_events(&stack).await.is_empty());
}

#[tokio::test]
async fn discarding_removes_the_letter_and_keeps_the_reason_in_the_audit_trail() {
    let sink = Sink::start(vec![Reply::Status(400); 3], Reply::Status(200)).await;
    let stack = Stack::start().await;
    for _ in 0..3 {
        let id = stack.send(webhook_body(&sink.url), None).await;
        stack.wait_status(&id, "dead_lettered").await;
    }
    let seqs = sequences(&stack).await;
    let token = admin(&stack, None);
    let (status, answer) = call(
        &stack,
        "DELETE",
        &format!("/v1/dlq/{}?reason=customer%20closed%20account", seqs[0]),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["reason"], "customer closed account");
    // The rest in bulk, through a job.
    let (status, job) = call(
        &stack,
        "POST",
        "/v1/dlq/discard",
        Some(&token),
        Some(json!({"filter": {"reason": "rejected"}, "rate": 100, "reason": "test data"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["matched"], 2);
    let job_id = job["job"].as_str().unwrap().to_owned();
    let done = eventually(Duration::from_secs(10), "the discard job to finish", || async {
        let (_, j) = call(&stack, "GET", &format!("/v1/dlq/jobs/{job_id}"), Some(&token), None).await;
        (j["finished"] == true).then_some(j)
    })
    .await;
    assert_eq!(done["discarded"], 2, "{done}");
    // Another tenant's token cannot follow it.
    let globex = admin(&stack, Some("globex"));
    let (status, _) = call(&stack, "GET", &format!("/v1/dlq/jobs/{job_id}"), Some(&globex), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(sequences(&stack).await.is_empty());
    let audit = audit_events(&stack).await;
    let actions: Vec<(&str, &str)> =
        audit.iter().map(|e| (e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap())).collect();
    assert_eq!(
        actions,
        [
            ("discard", "discarded"),
            ("bulk_discard", "started"),
            ("discard", "discarded"),
            ("discard", "discarded"),
            ("bulk_discard", "finished")
        ]
    );
    assert_eq!(audit[0]["reason"], "customer closed account");
    assert_eq!(audit[0]["actor"], "ops-alice");
    assert_eq!(audit[1]["count"], 2);
    assert_eq!(audit[4]["count"], 2);
    assert_eq!(audit[2]["reason"], "test data");
}

#[tokio::test]
async fn bulk_replay_of_a_thousand_letters_keeps_its_rate_and_delivers_each_once() {
    const N: usize = 1000;
    const RATE: f64 = 100.0;
    let sink = Sink::start(vec![Reply::Status(400); N], Reply::Status(200)).await;
    // Generous timeouts: a loaded machine must not turn a slow answer into a second send (a
    // webhook answered after the worker's timeout is retried, and the sink would count it twice).
    let stack = Stack::start_with(&[("HERALD_SEND_TIMEOUT", "10s"), ("HERALD_NATS_TIMEOUT", "5s")]).await;
    for _ in 0..N {
        stack.send(webhook_body(&sink.url), None).await;
    }
    eventually(Duration::from_secs(60), "a thousand dead letters", || async {
        (core(&stack).await.totals().await.unwrap().0 as usize == N).then_some(())
    })
    .await;
    let dlq = core(&stack).await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    // Timed from the first letter acted on to the last, as the pace is set.
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let progress = dlq
        .bulk(
            &Filter::default(),
            &Bulk::Replay,
            RATE,
            &Actor("tests".into()),
            |p: &Progress| {
                if p.done == 1 {
                    first = Some(Instant::now());
                }
                if p.done == N as u64 {
                    last = Instant::now();
                }
            },
            stop,
        )
        .await
        .unwrap();
    assert!(progress.finished, "{progress:?}");
    assert_eq!((progress.matched, progress.requeued, progress.skipped), (N as u64, N as u64, 0));
    let elapsed = (last - first.unwrap()).as_secs_f64();
    let achieved = (N - 1) as f64 / elapsed;
    assert!((achieved / RATE - 1.0).abs() <= 0.10, "{achieved:.1}/s against {RATE}/s");
    let delivered = eventually(Duration::from_secs(60), "every replayed letter to be delivered", || async {
        let s = successes(&sink, N);
        (s.len() == N).then_some(s)
    })
    .await;
    stack.wait_settled().await;
    assert!(delivered.values().all(|&n| n == 1));
    assert_eq!(sink.received().len(), 2 * N, "nothing sent twice");
}

#[tokio::test]
async fn an_interrupted_bulk_replay_run_again_finishes_without_sending_anything_twice() {
    const N: usize = 120;
    let sink = Sink::start(vec![Reply::Status(400); N], Reply::Status(200)).await;
    // Generous timeouts: a loaded machine must not turn a slow answer into a second send (a
    // webhook answered after the worker's timeout is retried, and the sink would count it twice).
    let stack = Stack::start_with(&[("HERALD_SEND_TIMEOUT", "10s"), ("HERALD_NATS_TIMEOUT", "5s")]).await;
    for _ in 0..N {
        stack.send(webhook_body(&sink.url), None).await;
    }
    eventually(Duration::from_secs(30), "the dead letters", || async {
        (core(&stack).await.totals().await.unwrap().0 as usize == N).then_some(())
    })
    .await;
    let replay = || {
        let mut c = Command::new(HERALD);
        c.args([
            "dlq", "replay", "--all", "--reason", "rejected", "--rate", "40", "--actor", "ops-bob", "--json",
        ])
        .env("HERALD_NATS_URL", stack.nats.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        c
    };
    let mut child = replay().spawn().unwrap();
    // Killed outright part way through, as a lost SSH session or a crash would stop it.
    eventually(Duration::from_secs(30), "part of the letters to be replayed", || async {
        let left = core(&stack).await.totals().await.unwrap().0 as usize;
        (left < N - 20).then_some(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let left = core(&stack).await.totals().await.unwrap().0 as usize;
    assert!(left > 0, "the replay finished before it was interrupted");

    let out = replay().output().unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["finished"], true, "{summary}");
    assert!(summary["matched"].as_u64().unwrap() as usize <= left, "{summary}");
    let delivered = eventually(Duration::from_secs(30), "every letter to be delivered", || async {
        let s = successes(&sink, N);
        (s.len() == N).then_some(s)
    })
    .await;
    stack.wait_settled().await;
    assert!(
        delivered.values().all(|&n| n == 1),
        "sent twice: {:?}",
        delivered.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(sink.received().len(), 2 * N);
    assert!(sequences(&stack).await.is_empty());
    // Every letter that left is accounted for; one whose replay was cut off between its audit
    // event and its deletion was done, and recorded, again.
    let audit = audit_events(&stack).await;
    assert!(audit.iter().all(|e| e["actor"] == "ops-bob"));
    let replayed: std::collections::HashSet<&str> = audit
        .iter()
        .filter(|e| e["action"] == "replay")
        .map(|e| e["notification_id"].as_str().unwrap())
        .collect();
    assert_eq!(replayed.len(), N, "a replayed letter without its audit event");
}
