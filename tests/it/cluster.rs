//! A real three-node JetStream cluster, and servers that fsync every write: what Herald's
//! durability claims rest on, checked against nats-server itself.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self,
    context::PublishAckFuture,
    message::PublishMessage,
    publish::PublishAck,
    stream::{self, StorageType},
};
use herald_shared::nats_server::{
    self, CLUSTER_SIZE, Locator, NatsCluster, NatsServer, ServerOptions, SyncPolicy, stream_leader,
};
use serde_json::Value;

use crate::support::{eventually, http_client};

const STREAM: &str = "FAILOVER";
/// Messages published in the failover test.
const TOTAL: usize = 300;
/// Publishes in flight together; the leader is killed while one batch waits for its acks.
const BATCH: usize = 20;
const KILL_AT_BATCH: usize = TOTAL / BATCH / 2;
/// How long one message may take to be acknowledged, retries included: an election after the
/// leader dies takes a few seconds.
const ACK_DEADLINE: Duration = Duration::from_secs(20);

fn stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        subjects: vec!["failover.>".into()],
        num_replicas: replicas,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

fn message(id: &str) -> PublishMessage {
    PublishMessage::build().payload(format!("body of {id}").into()).message_id(id)
}

/// Publishes `id` until the stream acknowledges it. A retry after a lost ack is answered as a
/// duplicate with the sequence of the first copy, which is what makes retrying safe.
async fn publish_until_acked(js: &jetstream::Context, id: String) -> (String, PublishAck, usize) {
    let deadline = Instant::now() + ACK_DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent: Result<PublishAckFuture, String> =
            js.send_publish("failover.msg", message(&id)).await.map_err(|e| e.to_string());
        let acked = match sent {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => return (id, ack, attempts),
            Err(e) if Instant::now() > deadline => {
                panic!("{id} was not acknowledged within {ACK_DEADLINE:?} ({attempts} attempts): {e}")
            }
            // "No responders" comes back at once while no node leads the stream; pace the retries.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// GET a monitoring endpoint as JSON.
async fn monitor(base: &str, path: &str) -> Value {
    http_client().get(format!("{base}{path}")).send().await.unwrap().json().await.unwrap()
}

/// Messages of `STREAM` held by the server behind this monitoring URL (its own replica).
async fn replica_messages(monitor_url: &str) -> Option<u64> {
    let jsz = monitor(monitor_url, "/jsz?streams=true").await;
    jsz["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == STREAM)?["state"]["messages"]
        .as_u64()
}

#[tokio::test]
async fn acknowledged_publishes_survive_losing_the_stream_leader() {
    let mut cluster = NatsCluster::for_test().await;
    let admin = jetstream::new(async_nats::connect(cluster.url_list()).await.unwrap());
    admin.create_stream(stream_config(3)).await.unwrap();
    let leader = eventually(Duration::from_secs(10), "a leader for the stream", || async {
        stream_leader(&admin, STREAM).await.ok().flatten()
    })
    .await;
    let victim = cluster.index_of(&leader).expect("the leader is one of the nodes");

    // The publisher is connected to the leader, so killing it also cuts the publisher off and
    // the client has to reconnect to one of the other two URLs.
    let mut urls = cluster.url_list();
    urls.rotate_left(victim);
    let disconnects = Arc::new(AtomicUsize::new(0));
    let counter = disconnects.clone();
    let client = async_nats::ConnectOptions::new()
        .retain_servers_order()
        .connection_timeout(Duration::from_secs(1))
        .event_callback(move |event| {
            let counter = counter.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .connect(urls)
        .await
        .unwrap();
    assert_eq!(client.server_info().server_name, leader);
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone());

    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut retried = 0;
    let mut killed = None;
    for batch in 0..TOTAL / BATCH {
        let publishes = futures::future::join_all(
            (batch * BATCH..(batch + 1) * BATCH).map(|i| publish_until_acked(&js, format!("msg-{i}"))),
        );
        let kill = async {
            // join! polls the publishes first, so by now the whole batch is on the wire and
            // waiting for acks.
            if batch == KILL_AT_BATCH {
                cluster.kill(victim);
                killed = Some(Instant::now());
            }
        };
        let (results, ()) = tokio::join!(publishes, kill);
        for (id, ack, attempts) in results {
            assert!(acked.insert(id, ack.sequence).is_none());
            retried += attempts - 1;
        }
        if batch == KILL_AT_BATCH {
            eprintln!(
                "cluster: the batch in flight at the kill was acknowledged {:?} after it ({retried} retries)",
                killed.unwrap().elapsed()
            );
        }
    }
    assert!(disconnects.load(Ordering::SeqCst) >= 1, "the publisher was connected to the killed node");
    let new_leader = stream_leader(&admin, STREAM).await.unwrap().unwrap();
    assert_ne!(new_leader, leader, "a surviving node took over");

    let restarted = Instant::now();
    cluster.restart(victim).await.unwrap();
    eprintln!("cluster: {leader} rejoined {:?} after its restart", restarted.elapsed());
    // The restarted node's own replica catches up with everything that was acknowledged.
    let victim_monitor = cluster.monitor_url(victim);
    eventually(Duration::from_secs(15), "the restarted replica to catch up", || async {
        (replica_messages(&victim_monitor).await == Some(TOTAL as u64)).then_some(())
    })
    .await;

    // Every acknowledged message is stored exactly once, at the sequence its ack named.
    let stream = admin.get_stream(STREAM).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    assert_eq!(state.messages, TOTAL as u64, "no message lost or stored twice");
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        let id = message.headers.get("Nats-Msg-Id").expect("every message has an id").to_string();
        stored.entry(id).or_default().push(seq);
    }
    assert_eq!(stored.len(), TOTAL);
    for (id, seq) in &acked {
        assert_eq!(stored.get(id), Some(&vec![*seq]), "{id} acknowledged at {seq}");
    }
}

/// Publishes `count` messages with ids to `STREAM` and checks the acks and the stream.
async fn check_publishes(js: &jetstream::Context, replicas: usize, count: u64) {
    js.create_stream(stream_config(replicas)).await.unwrap();
    // A replicated stream takes publishes once its leader is elected, a moment after it is
    // created (on a loaded machine, after the first publish has been refused): the first
    // message is sent until it is acknowledged; a refused one was not stored.
    let first = crate::support::eventually(
        std::time::Duration::from_secs(20),
        "the new stream to take a publish",
        || async { js.send_publish("failover.msg", message("m1")).await.ok()?.await.ok() },
    )
    .await;
    // (A retry after a lost ack finds it stored: a duplicate of sequence 1.)
    assert_eq!(first.sequence, 1);
    for i in 2..=count {
        let ack = js.send_publish("failover.msg", message(&format!("m{i}"))).await.unwrap().await.unwrap();
        assert_eq!((ack.sequence, ack.duplicate), (i, false));
    }
    let again = js.send_publish("failover.msg", message("m1")).await.unwrap().await.unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    // A stream just created on a cluster may not be known yet to the node that answers info.
    let messages =
        crate::support::eventually(std::time::Duration::from_secs(10), "the stream's info", || async {
            Some(js.get_stream(STREAM).await.ok()?.get_info().await.ok()?.state.messages)
        })
        .await;
    assert_eq!(messages, count);
}

fn sync_always(varz: &Value) -> bool {
    varz["jetstream"]["config"]["sync_always"] == true
}

#[tokio::test]
async fn sync_always_servers_start_and_accept_publishes() {
    let start =
        |sync| move || NatsServer::start_with_sync(&Locator::from_env(), ServerOptions::default(), sync);
    let server = tokio::task::spawn_blocking(start(SyncPolicy::Always)).await.unwrap().unwrap();
    assert!(sync_always(&monitor(&server.monitor_url(), "/varz").await));
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    check_publishes(&js, 1, 50).await;

    let plain = tokio::task::spawn_blocking(start(SyncPolicy::Periodic)).await.unwrap().unwrap();
    assert!(!sync_always(&monitor(&plain.monitor_url(), "/varz").await), "the default is periodic");

    let cluster = NatsCluster::start(&Locator::from_env(), SyncPolicy::Always).await.unwrap();
    for i in 0..CLUSTER_SIZE {
        assert!(sync_always(&monitor(&cluster.monitor_url(i), "/varz").await), "{}", cluster.node_name(i));
    }
    let js = jetstream::new(async_nats::connect(cluster.url_list()).await.unwrap());
    check_publishes(&js, 3, 50).await;
    let leader = nats_server::stream_leader(&js, STREAM).await.unwrap().unwrap();
    assert!(cluster.index_of(&leader).is_some(), "{leader}");

    // Consumers and buckets have leaders of their own (a bucket is the stream KV_<bucket>).
    let consumer = jetstream::consumer::pull::Config {
        durable_name: Some("reader".into()),
        num_replicas: 3,
        ..Default::default()
    };
    js.get_stream(STREAM).await.unwrap().create_consumer(consumer).await.unwrap();
    let bucket = jetstream::kv::Config { bucket: "things".into(), num_replicas: 3, ..Default::default() };
    js.create_key_value(bucket).await.unwrap();
    for leader in [
        nats_server::consumer_leader(&js, STREAM, "reader").await.unwrap(),
        nats_server::bucket_leader(&js, "things").await.unwrap(),
    ] {
        let leader = leader.expect("a leader");
        assert!(cluster.index_of(&leader).is_some(), "{leader}");
    }
}
