//! Herald on a 3-node R3 cluster losing, under load, the node that leads HERALD_INTENTS, then
//! the one leading the ledger's bucket, then the one leading the webhook consumer, then the
//! intents' leader again. Nothing accepted may be lost, nothing sent twice (with
//! `HERALD_UNCERTAIN=park`), and every accepted notification must be readable by `GET` after.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use herald_shared::{
    config,
    nats_server::{NatsCluster, bucket_leader, consumer_leader, stream_leader},
    topology::{INTENTS_STREAM, NOTIFICATIONS_BUCKET},
};
use poem::http::StatusCode;

use crate::support::{Sink, Stack, eventually, webhook_body};

/// Requests per second offered while the leaders are killed (and for two seconds after).
const RATE_PER_SECOND: u64 = 40;

#[tokio::test]
async fn a_cluster_losing_its_leaders_under_load_loses_nothing_and_sends_nothing_twice() {
    let cluster = NatsCluster::for_test().await;
    let urls = cluster.urls();
    let stack = Stack::on(
        cluster,
        &urls,
        &[
            (config::STREAM_REPLICAS, "3"),
            (config::UNCERTAIN, "park"),
            (config::MAX_ATTEMPTS, "10"),
            (config::RETRY_BACKOFF, "200ms,500ms,1s"),
            (config::SEND_TIMEOUT, "2s"),
            (config::NATS_TIMEOUT, "2s"),
        ],
    )
    .await;
    let stack = Arc::new(tokio::sync::Mutex::new(stack));
    let sink = Arc::new(Sink::ok().await);
    let (base, token, http) = {
        let s = stack.lock().await;
        (s.base.clone(), s.token.clone(), s.http.clone())
    };

    // Load: each request keeps its Idempotency-Key until it gets a 202.
    let accepted: Arc<Mutex<HashMap<String, String>>> = Default::default();
    let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let (chaos_done, load_stop) = tokio::sync::watch::channel(false);
    let mut requests = tokio::task::JoinSet::new();
    let load = {
        let (accepted, retried, sink) = (accepted.clone(), retried.clone(), sink.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_SECOND));
            let mut n = 0;
            while !*load_stop.borrow() {
                tick.tick().await;
                n += 1;
                let key = format!("failover-{n}");
                let body = webhook_body(&sink.url).to_string();
                let (http, base, token, accepted, retried) =
                    (http.clone(), base.clone(), token.clone(), accepted.clone(), retried.clone());
                requests.spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while Instant::now() < deadline {
                        let answer = http
                            .post(format!("{base}/v1/notifications"))
                            .bearer_auth(&token)
                            .header("Content-Type", "application/json")
                            .header("Idempotency-Key", &key)
                            .body(body.clone())
                            .send()
                            .await;
                        if let Ok(resp) = answer
                            && resp.status() == 202
                        {
                            let v: serde_json::Value = resp.json().await.unwrap();
                            accepted.lock().unwrap().insert(key, v["id"].as_str().unwrap().to_owned());
                            return;
                        }
                        retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    panic!("{key} was never accepted");
                });
            }
            while let Some(r) = requests.join_next().await {
                r.unwrap();
            }
        })
    };

    // Chaos: kill whoever leads each part, wait for a new leader, bring the node back.
    let mut kills = Vec::new();
    for what in ["intents", "ledger", "consumer", "intents"] {
        // Let the load run against a whole cluster for a moment between kills.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let js = stack.lock().await.js.clone();
        let leader = eventually(Duration::from_secs(30), &format!("a leader of the {what}"), || async {
            match what {
                "intents" => stream_leader(&js, INTENTS_STREAM).await.ok().flatten(),
                "ledger" => bucket_leader(&js, NOTIFICATIONS_BUCKET).await.ok().flatten(),
                _ => consumer_leader(&js, INTENTS_STREAM, "webhook").await.ok().flatten(),
            }
        })
        .await;
        let mut s = stack.lock().await;
        let i = s.nats.index_of(&leader).unwrap();
        println!("{:>5.1}s: killing {leader}, leader of the {what}", started.elapsed().as_secs_f64());
        s.nats.kill(i);
        drop(s);
        kills.push((what, leader.clone()));
        eventually(Duration::from_secs(30), "a new leader", || async {
            let l = match what {
                "intents" => stream_leader(&js, INTENTS_STREAM).await.ok().flatten(),
                "ledger" => bucket_leader(&js, NOTIFICATIONS_BUCKET).await.ok().flatten(),
                _ => consumer_leader(&js, INTENTS_STREAM, "webhook").await.ok().flatten(),
            };
            l.filter(|l| *l != leader)
        })
        .await;
        stack.lock().await.nats.restart(i).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    chaos_done.send_replace(true);
    load.await.unwrap();
    let load_secs = started.elapsed().as_secs();
    let accepted = accepted.lock().unwrap().clone();

    // Every accepted notification is delivered, readable by GET, and was received once.
    let stack = stack.lock().await;
    let mut statuses: HashMap<String, usize> = HashMap::new();
    let mut status_of: HashMap<String, String> = HashMap::new();
    for id in accepted.values() {
        let body =
            eventually(Duration::from_secs(60), &format!("{id} to be settled and readable"), || async {
                let (code, body) = stack.get(id).await;
                (code == StatusCode::OK && ["delivered", "dead_lettered"].contains(&body["status"].as_str()?))
                    .then_some(body)
            })
            .await;
        *statuses.entry(body["status"].as_str().unwrap().to_owned()).or_default() += 1;
        status_of.insert(id.clone(), body["status"].as_str().unwrap().to_owned());
    }
    let mut received: HashMap<String, usize> = HashMap::new();
    for r in sink.received() {
        *received.entry(r.body["id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    let twice: Vec<_> = received.iter().filter(|(_, n)| **n > 1).collect();
    let dead = stack.dead_letters().await;
    let reasons: Vec<String> =
        dead.iter().map(|m| crate::support::header(m, herald_shared::deadletter::headers::REASON)).collect();
    println!("dead-letter reasons: {reasons:?}");
    println!(
        "accepted {}, {:?}, received {} distinct, sent twice {}, dead letters {}, requests retried {}, kills {:?}",
        accepted.len(),
        statuses,
        received.len(),
        twice.len(),
        dead.len(),
        retried.load(std::sync::atomic::Ordering::Relaxed),
        kills
    );
    assert!(twice.is_empty(), "sent twice in park mode: {twice:?}");
    for id in accepted.values() {
        let delivered = status_of[id] == "delivered" && received.contains_key(id);
        let parked = dead.iter().any(|m| {
            herald_shared::Intent::from_message(
                &m.payload,
                Some(&m.headers),
                herald_shared::Channel::Webhook,
                None,
            )
            .is_ok_and(|i| i.id == *id)
        });
        assert!(delivered || parked, "{id} was accepted and is neither delivered nor parked");
    }
    assert!(accepted.len() as u64 >= RATE_PER_SECOND * load_secs / 2, "too little load: {}", accepted.len());
}
