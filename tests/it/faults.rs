//! Processes killed for real: nothing accepted is silently lost.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use herald_shared::{config, deadletter::headers as dlq, state::Status};

use crate::support::{Reply, Sink, Stack, header, webhook_body};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// `herald worker` as a child process against the stack's nats-server, killed with SIGKILL on drop.
struct WorkerProcess(Child);

impl WorkerProcess {
    fn start(stack: &Stack) -> WorkerProcess {
        let child = Command::new(HERALD)
            .arg("worker")
            .env(config::NATS_URL, stack.nats.url())
            .env(config::WEBHOOK_SECRET, crate::support::WEBHOOK_SECRET)
            .env(config::WEBHOOK_ALLOW_PRIVATE, "true")
            .env(config::JWT_SECRET, "unused")
            .env(config::MAX_ATTEMPTS, "2")
            .env(config::RETRY_BACKOFF, "50ms")
            // Long enough to kill the worker mid-send. A dead worker's message comes back after
            // the claim's lifetime: 1 s + 2 × 1 s + 2 s = 5 s.
            .env(config::SEND_TIMEOUT, "1s")
            .env(config::NATS_TIMEOUT, "1s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        WorkerProcess(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_worker_killed_on_every_attempt_still_ends_in_the_dlq() {
    // Only the stack's nats-server is used: its in-process gateway and workers stop at once,
    // and deliveries are made by `herald worker` processes that this test kills mid-send.
    let mut stack = Stack::start_with(&[(config::MAX_ATTEMPTS, "2")]).await;
    stack.shutdown().await;
    let sink = Sink::start(vec![], Reply::Hang).await;
    let id = "crash-1";
    let intent = serde_json::json!({
        "id": id,
        "recipient": webhook_body(&sink.url)["recipient"],
        "content": {"body": "survive this"}
    });
    stack.publish_intent(intent.to_string().into_bytes(), Some(id), None).await;

    // Attempt 1: the worker is killed while the receiver holds the request.
    let mut first = WorkerProcess::start(&stack);
    sink.wait_for(1).await;
    first.kill();
    // Its claim lapses with no outcome: uncertain, and resent (the default) as attempt 2, the
    // last: killed again.
    let mut second = WorkerProcess::start(&stack);
    sink.wait_for(2).await;
    second.kill();

    // Uncertain again with no attempt left: the next worker parks it instead of sending.
    let _third = WorkerProcess::start(&stack);
    let dl = stack.wait_dead_letters(1).await;
    assert_eq!(header(&dl[0], dlq::REASON), "uncertain");
    assert_eq!(header(&dl[0], dlq::ATTEMPTS), "2");
    let intent =
        herald_shared::Intent::from_message(&dl[0].payload, None, herald_shared::Channel::Webhook, None)
            .unwrap();
    assert_eq!(intent.id, id);
    let record =
        crate::support::eventually(Duration::from_secs(10), "the record to say dead_lettered", || async {
            let record = stack.record(id).await?;
            (record.overall() == Status::DeadLettered).then_some(record)
        })
        .await;
    let webhook = &record.channels[&herald_shared::Channel::Webhook];
    assert!(webhook.last_error.as_deref().unwrap().starts_with("uncertain"), "{webhook:?}");
    assert_eq!(webhook.attempts, 2);
    assert_eq!(sink.received().len(), 2, "no attempt beyond the maximum");
}
