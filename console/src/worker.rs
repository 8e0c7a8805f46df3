//! The background task: the only place the running console talks to NATS. It connects (and keeps
//! trying), follows the status events, and carries out [`Action`]s, answering each with an
//! [`Update`]. The screen never waits for it.

use std::time::Duration;

use futures::StreamExt as _;
use herald_shared::{
    Config,
    dlq::{Actor, Bulk, Replayed},
};
use tokio::sync::{mpsc, watch};

use crate::{
    app::{Action, Update},
    source::{self, HISTORY, Source, Start},
};

/// Runs until the screen drops its end of `actions`.
pub async fn serve(
    config: Config,
    actor: Actor,
    mut actions: mpsc::UnboundedReceiver<Action>,
    updates: mpsc::UnboundedSender<Update>,
) {
    // One client for every attempt: it reconnects by itself; only the topology is retried.
    let (client, js) = match herald_shared::topology::connect(&config, "herald-console").await {
        Ok(c) => c,
        Err(e) => {
            // A bad URL: nothing to retry. Say so until the operator quits.
            let _ = updates.send(Update::Connecting(format!("{e:#}")));
            while actions.recv().await.is_some() {}
            return;
        }
    };
    let source = loop {
        tokio::select! {
            connected = Source::on(client.clone(), js.clone(), &config, config.nats_timeout * 4) => match connected {
                Ok(source) => break source,
                Err(e) => {
                    let _ = updates.send(Update::Connecting(format!("{e:#}")));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            action = actions.recv() => match action {
                // Nothing can be done before the topology is known; the screen says so.
                Some(_) => {}
                None => return,
            },
        }
    };
    let _ = updates.send(Update::Connected);
    let feed = tokio::spawn(follow(source.clone(), updates.clone()));
    let mut bulk_stop: Option<watch::Sender<bool>> = None;
    while let Some(action) = actions.recv().await {
        match action {
            Action::CancelBulk => {
                if let Some(stop) = &bulk_stop {
                    stop.send_replace(true);
                }
            }
            Action::BulkReplay { filter, rate } => {
                let (stop, stopped) = watch::channel(false);
                bulk_stop = Some(stop);
                let (source, actor, updates) = (source.clone(), actor.clone(), updates.clone());
                tokio::spawn(async move {
                    let report = |p: &herald_shared::dlq::Progress| {
                        let _ = updates.send(Update::Bulk(p.clone()));
                    };
                    let result = source.dlq.bulk(&filter, &Bulk::Replay, rate, &actor, report, stopped).await;
                    let done = match result {
                        Ok(p) => Update::Done {
                            message: format!("bulk replay: {}", crate::cli::summary(&p)),
                            ok: p.error.is_none(),
                        },
                        Err(e) => {
                            let _ = updates.send(Update::Bulk(herald_shared::dlq::Progress {
                                error: Some(e.to_string()),
                                ..Default::default()
                            }));
                            Update::Done { message: format!("bulk replay: {e}"), ok: false }
                        }
                    };
                    let _ = updates.send(done);
                });
            }
            other => {
                let update = handle(&source, &actor, other).await;
                if updates.send(update).is_err() {
                    break;
                }
            }
        }
    }
    feed.abort();
}

/// Carries out one action.
pub async fn handle(source: &Source, actor: &Actor, action: Action) -> Update {
    match action {
        Action::LoadOverview => Update::Overview(source::load_overview(source).await),
        Action::LoadLetters(filter) => {
            let page = source::load_letters(source, &filter).await.map_err(|e| format!("{e:#}"));
            Update::Letters(filter, page)
        }
        Action::LoadDetail(seq) => Update::Detail(
            seq,
            Box::new(source::load_detail(source, seq).await.map_err(|e| format!("{e:#}"))),
        ),
        Action::Lookup(id) => {
            let found = source::lookup(source, &id).await.map_err(|e| format!("{e:#}"));
            Update::Lookup(id, found)
        }
        Action::Replay(seq) => match source.dlq.replay(seq, actor).await {
            Ok(Replayed::Requeued { intent_sequence }) => Update::Done {
                message: format!("dead letter {seq} requeued (intent {intent_sequence})"),
                ok: true,
            },
            Ok(Replayed::AlreadyDelivered) => Update::Done {
                message: format!("dead letter {seq} was already delivered: nothing sent, letter removed"),
                ok: true,
            },
            Err(e) => Update::Done { message: e.to_string(), ok: false },
        },
        Action::Discard { sequence, reason } => match source.dlq.discard(sequence, actor, &reason).await {
            Ok(()) => Update::Done { message: format!("dead letter {sequence} discarded"), ok: true },
            Err(e) => Update::Done { message: e.to_string(), ok: false },
        },
        Action::BulkReplay { .. } | Action::CancelBulk => {
            Update::Done { message: "bulk actions run beside the other work".into(), ok: false }
        }
    }
}

/// Follows the status events from [`HISTORY`] ago, forever, starting again after the last one
/// seen when the feed fails (the ordered consumer survives reconnects, not a deleted stream).
async fn follow(source: Source, updates: mpsc::UnboundedSender<Update>) {
    let mut start = Start::Since(HISTORY);
    loop {
        if let Ok(feed) = source::status_feed(&source, start).await {
            futures::pin_mut!(feed);
            // Batches keep a burst of events from costing a redraw each.
            let mut batch = Vec::new();
            loop {
                let next = if batch.is_empty() {
                    feed.next().await
                } else {
                    match tokio::time::timeout(Duration::from_millis(50), feed.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            if updates.send(Update::Events(std::mem::take(&mut batch))).is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                };
                match next {
                    Some(Ok(seen)) => {
                        start = Start::After(seen.sequence);
                        batch.push(seen.event);
                        if batch.len() >= 500
                            && updates.send(Update::Events(std::mem::take(&mut batch))).is_err()
                        {
                            return;
                        }
                    }
                    Some(Err(_)) | None => break,
                }
            }
            if !batch.is_empty() && updates.send(Update::Events(batch)).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
